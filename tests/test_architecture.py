"""The package's structure, as the internals page draws it: layers that import only downwards,
no import circle, and modules of a readable size.

Imports are read from the source (every ``import`` statement, those inside functions included),
so a lazy import counts like any other."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "centerkern"

# Lowest first: a module may import its own layer and those below it, never one above.
LAYERS = (
    ("core", ("centerkern._core",)),
    ("backends", ("centerkern._backends", "centerkern.cuda")),
    ("public functions", ("centerkern._api", "centerkern")),
    ("adapters' shared parts", ("centerkern._adapters",)),
    ("adapters", ("centerkern.torch", "centerkern.jax", "centerkern.tensorflow", "centerkern.dask",
                  "centerkern.distributed")),
    ("testing", ("centerkern.testing",)),
    ("tools", ("centerkern._cli", "centerkern.__main__")),
)
MOST_LINES = 600
# A module longer than MOST_LINES says why in its docstring, with these words.
LONG_BECAUSE = "Longer than 600 lines because"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> int:
    """The index in LAYERS of the longest prefix naming ``module``."""
    best, best_length = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    assert best is not None, f"{module} is in no layer"
    return best


def _imports(module: str) -> set[str]:
    """The modules of centerkern that ``module`` imports, anywhere in its source."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:  # ``from package import module`` imports that module
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in MODULES else source)
    return {name for name in found if name in MODULES and name != module}


GRAPH = {module: _imports(module) for module in MODULES}


def test_every_module_is_in_a_layer():
    assert {module: _layer(module) for module in MODULES}  # _layer asserts each one


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_layer_above_its_own(module):
    upward = {imported: LAYERS[_layer(imported)][0] for imported in GRAPH[module]
              if _layer(imported) > _layer(module)}
    assert not upward, f"{module} ({LAYERS[_layer(module)][0]}) imports from above: {upward}"


def test_the_core_imports_nothing_of_centerkern_outside_it():
    outside = {module: sorted(name for name in GRAPH[module] if not name.startswith("centerkern._core"))
               for module in MODULES if module.startswith("centerkern._core")}
    assert not any(outside.values()), outside


def test_no_import_circle():
    """No module reaches itself through the imports of others (a depth-first search)."""
    state: dict[str, str] = {}
    circles = []

    def visit(module, path):
        state[module] = "open"
        for imported in sorted(GRAPH[module]):
            if state.get(imported) == "open":
                circles.append(path[path.index(imported):] + [imported])
            elif imported not in state:
                visit(imported, path + [imported])
        state[module] = "done"

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])
    assert not circles, circles


def test_the_layers_are_few():
    """The longest chain of imports, module to module: the depth a reader descends. It runs from
    the command line through the numba backend's own modules (driver, step, passes, rows, jit)
    down to the core."""
    depth: dict[str, int] = {}

    def longest(module):
        if module not in depth:
            depth[module] = 1 + max((longest(imported) for imported in GRAPH[module]), default=0)
        return depth[module]

    assert max(longest(module) for module in MODULES) <= 10


@pytest.mark.parametrize("module", sorted(MODULES))
def test_a_long_module_says_why(module):
    path = MODULES[module]
    lines = len(path.read_text().splitlines())
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert lines <= MOST_LINES or LONG_BECAUSE in docstring, f"{module}: {lines} lines, and no reason given"
