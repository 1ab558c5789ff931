"""Links into Python's, NumPy's, torch's, JAX's and Numba's documentation, in a build that needs no
network.

Sphinx's intersphinx reads each project's ``objects.inv`` from its site at every build; a build
without a network (a CI runner with only a package index, an air-gapped cluster) would then warn,
and this site builds with warnings as errors. So the entries the site links to are kept in
``docs/_inventories/<project>.txt``, one line per object in the text form of an inventory (name,
``domain:role``, priority, address within the project's site, display name or ``-``), and this
extension writes each into an ``objects.inv`` that intersphinx reads from disk.

``offline_inventories`` in ``conf.py`` maps each project to the root of its site. A name the
site links to and no inventory holds is still a build error (``nitpicky``): add its line to the
project's file. ``make docs-linkcheck`` checks every address against the live sites.
"""

from __future__ import annotations

import zlib
from pathlib import Path

HEADER = "# Sphinx inventory version 2\n# Project: {project}\n# Version: \n# The remainder of this file is compressed using zlib.\n"


def entries(text: str) -> list[str]:
    """The inventory lines of a ``_inventories`` file (comments and blank lines left out)."""
    lines = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 5 or ":" not in fields[1]:
            raise ValueError(f"line {number}: {line!r} is not 'name domain:role priority address display'")
        lines.append(" ".join(fields))
    return lines


def write_inventory(source: Path, destination: Path) -> None:
    body = "\n".join(entries(source.read_text())) + "\n"
    destination.parent.mkdir(parents=True, exist_ok=True)
    destination.write_bytes(HEADER.format(project=source.stem).encode() + zlib.compress(body.encode()))


def _set_mapping(app, config) -> None:
    sources = Path(app.confdir) / "_inventories"
    built = Path(app.doctreedir) / "inventories"
    mapping = dict(config.intersphinx_mapping or {})
    for project, site in config.offline_inventories.items():
        inventory = built / f"{project}.inv"
        write_inventory(sources / f"{project}.txt", inventory)
        mapping[project] = (site, str(inventory))
    config.intersphinx_mapping = mapping


def setup(app):
    app.setup_extension("sphinx.ext.intersphinx")
    app.add_config_value("offline_inventories", {}, "env")
    # before intersphinx's own check of the mapping (priority 800)
    app.connect("config-inited", _set_mapping, priority=100)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
