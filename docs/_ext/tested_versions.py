"""``{tested-versions}``: a table of what each requirement of pyproject.toml accepts and which
version the tests run (requirements/test.lock), read when the site is built so that the page
cannot fall behind either file."""

from __future__ import annotations

import tomllib
from pathlib import Path

from docutils import nodes
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from sphinx.util.docutils import SphinxDirective

ROOT = Path(__file__).resolve().parents[2]


def _locked() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / "test.lock").read_text().splitlines():
        name, separator, version = line.split("#", 1)[0].strip().partition("==")
        if separator:
            pins[canonicalize_name(name)] = version
    return pins


def rows() -> list[tuple[str, str, str, str]]:
    """(package, where it is needed, the range supported, the version tested) per requirement."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _locked()
    found: dict[str, tuple[str, str, str, str]] = {}
    groups = [("core", project["dependencies"])]
    groups += [(f"[{extra}]", project["optional-dependencies"][extra])
               for extra in ("cuda", "torch", "jax", "tensorflow", "dask", "testing", "examples", "bench")]
    for where, requirements in groups:
        for text in requirements:
            requirement = Requirement(text)
            name = canonicalize_name(requirement.name)
            if name in found:
                continue
            found[name] = (requirement.name, where, str(requirement.specifier), pins.get(name, "not locked"))
    return list(found.values())


class TestedVersions(SphinxDirective):
    has_content = False

    def run(self) -> list[nodes.Node]:
        self.env.note_dependency(str(ROOT / "pyproject.toml"))
        self.env.note_dependency(str(ROOT / "requirements" / "test.lock"))
        header = ("package", "needed by", "supported", "tested (the lock)")
        table = nodes.table()
        group = nodes.tgroup(cols=len(header))
        table += group
        group.extend(nodes.colspec(colwidth=1) for _ in header)

        def row(cells, versions_as_code: bool) -> nodes.row:
            line = nodes.row()
            for column, cell in enumerate(cells):
                code = versions_as_code and column >= 2
                line += nodes.entry("", nodes.paragraph("", "", nodes.literal(text=cell) if code else nodes.Text(cell)))
            return line

        head = nodes.thead()
        head += row(header, versions_as_code=False)
        body = nodes.tbody()
        body.extend(row(cells, versions_as_code=True) for cells in rows())
        group += head
        group += body
        return [table]


def setup(app):
    app.add_directive("tested-versions", TestedVersions)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
