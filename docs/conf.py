"""Sphinx configuration of centerkern's documentation site.

Built by ``make docs`` with warnings as errors: a broken cross-reference, a public name without
its docstring sections, or an example that no longer runs fails the build (``_ext/``).
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(DOCS.parent))

import centerkern  # noqa: E402  (the version shown is the one documented)

project = "centerkern"
author = "the centerkern developers"
copyright = "2026, the centerkern developers"
release = centerkern.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax from the site itself: the math renders without a network
    "sphinx.ext.viewcode",  # [source] beside every documented name
    "numpydoc",
    "myst_parser",
    "sphinx_copybutton",
    "executed_examples",
    "known_mistakes",
    "benchmark_pages",
    "example_scripts",  # {example-output}: a script of examples/ run at build time, its output shown
    "offline_inventories",  # intersphinx, read from docs/_inventories without a network
    "tested_versions",
]

# the sites the API reference and guides link into (np.ndarray, torch.Tensor, jax.Array, ...)
offline_inventories = {
    "python": "https://docs.python.org/3/",
    "numpy": "https://numpy.org/doc/stable/",
    "torch": "https://docs.pytorch.org/docs/stable/",
    "jax": "https://docs.jax.dev/en/latest/",
    "numba": "https://numba.readthedocs.io/en/stable/",
}

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "_generated/**/*.md.part", "Thumbs.db", ".DS_Store"]
nitpicky = True
# names the docstrings use as plain types (numpydoc turns "array" or "int" in a type line into a
# cross-reference): what they mean is said in the prose around them
nitpick_ignore_regex = [
    ("py:class", r"(array|array-like|optional|scalar|str|int|float|bool|callable|tuple|list|dict|"
                 r"None|object|sequence|mapping|iterable|default|or|of|shape|\(.*\)|[A-Z]|[0-9].*|"
                 r"np\..*|numpy\..*|torch\..*|jax\..*|tf\..*|keras\..*|dask\..*|numba\..*|cupy\..*)"),
]

myst_enable_extensions = ["colon_fence", "dollarmath", "deflist"]
myst_heading_anchors = 3

numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
# the types in Parameters and Returns link to their documentation: numpydoc's own aliases (int,
# float, bool, None, array_like, np.ndarray, ...) and the frameworks' types below; other words
# ("all") stay text
numpydoc_xref_param_type = True
numpydoc_xref_aliases = {
    # "array" is the caller framework's array, not only NumPy's (numpydoc would link ndarray)
    "array": "array",
    "numpy.ndarray": ":class:`numpy.ndarray`",
    "torch.Tensor": ":class:`torch.Tensor`",
    "DTensor": ":class:`~torch.distributed.tensor.DTensor`",
    "DeviceMesh": ":class:`~torch.distributed.device_mesh.DeviceMesh`",
    "jax.Array": ":class:`jax.Array`",
}
numpydoc_xref_ignore = "all"
# every public name: a docstring (GL08) whose Parameters match the signature (PR01, PR02); which
# sections each must have (Examples, Raises, ...) and that every name of __all__ is documented
# are the executed_examples extension's checks
numpydoc_validation_checks = {"GL08", "PR01", "PR02"}
# module constants (RULES, KNOWN_MISTAKES, ...) are described by a comment, not a docstring
numpydoc_validation_exclude = {r"\.[A-Z][A-Z0-9_]+$",
                               # hypothesis's composite strategies hide their source from numpydoc:
                               # their sections are checked by executed_examples instead
                               r"^centerkern\.testing\.strategies\."}

# executed_examples: every name of these modules' __all__ must be in the API reference; the
# examples of the last ones use Numba device arrays and run under Numba's CUDA simulator
executed_examples_public_modules = (
    "centerkern",
    "centerkern.codebooks",
    "centerkern.cuda",
    "centerkern.torch",
    "centerkern.jax",
    "centerkern.tensorflow",
    "centerkern.distributed",
    "centerkern.dask",
    "centerkern.testing",
    "centerkern.testing.strategies",
)
executed_examples_simulated_modules = ("centerkern.cuda",)

autodoc_typehints = "none"
autodoc_member_order = "bysource"

html_theme = "pydata_sphinx_theme"
html_title = f"centerkern {release}"
html_static_path = ["_static"]
html_css_files = ["centerkern.css"]
html_theme_options = {
    "navigation_with_keys": False,
    "header_links_before_dropdown": 11,  # every page in the top bar
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": [],
}
# the guides are single pages (the top bar lists them); the API reference has a page per module
html_sidebars = {"*": [], "api/*": ["sidebar-nav-bs"]}
html_show_sourcelink = False
trim_doctest_flags = True
# the copy button copies the code of ">>> " examples without their prompts and output
copybutton_prompt_text = r">>> |\.\.\. "
copybutton_prompt_is_regexp = True
copybutton_only_copy_prompt_lines = True
pygments_style = "sphinx"
