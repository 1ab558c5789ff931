"""Every example on the site runs while the site is built, and every public name is documented.

An example that stops working is a build warning, and ``make docs`` builds with warnings as
errors, so the site cannot show code that fails.

What runs:

- **The guides' code blocks**, in page order, in one namespace per page (a page reads like a
  session: a later block may use what an earlier one defined), in a scratch directory. A block
  whose text starts with ``>>>`` is a doctest (its printed output is compared), any other
  ``python`` block is executed and must not raise.
- **Every docstring's Examples**, as doctests, each docstring in a fresh namespace.
- **What needs a GPU**: the docstrings of the modules named in
  ``executed_examples_simulated_modules`` (``conf.py``: ``centerkern.cuda``) and the guide blocks with the class
  ``cuda-simulator`` run in a child process under Numba's CUDA simulator (it must be switched on
  before Numba is imported, so not in this process). Blocks with the class ``needs-gpu`` alone
  use a framework's CUDA arrays (torch, CuPy), which the simulator cannot give: they are compiled,
  so that a syntax error fails the build, and shown with a "needs a CUDA GPU" mark.

What is checked besides:

- Every name in the ``__all__`` of each module of ``executed_examples_public_modules``
  (``conf.py``) is documented somewhere on the site.
- Every public function and class has its sections: Examples; Parameters and Raises where it
  takes arguments; Returns for a function (numpydoc's own validation, configured in
  ``conf.py``, checks that the Parameters section matches the signature).

Blocks in other languages (``bash``, ``text``, ``dockerfile``) are shown as they are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import doctest
import importlib
import inspect
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from docutils import nodes
from sphinx.util import logging

logger = logging.getLogger(__name__)

DOCTEST_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
PYTHON_LANGUAGES = ("python", "python3", "py", "pycon")
CUDA_SIMULATOR = "cuda-simulator"
NEEDS_GPU = "needs-gpu"
SLOW_EXAMPLE_S = 10.0

_CHILD = Path(__file__).with_name("_simulated_examples.py")


class _Scratch:
    """The directory the examples run in (they may write files: a saved model, a checkpoint)."""

    path: Path | None = None

    @classmethod
    def directory(cls) -> Path:
        if cls.path is None:
            cls.path = Path(tempfile.mkdtemp(prefix="centerkern-docs-"))
        return cls.path


@contextlib.contextmanager
def _in_scratch():
    previous = os.getcwd()
    os.chdir(_Scratch.directory())
    try:
        yield
    finally:
        os.chdir(previous)


def run_doctest(source: str, name: str, globs: dict, filename: str, lineno: int = 0) -> str | None:
    """Run ``source``'s ``>>>`` examples in ``globs`` (kept: later blocks of a page see them);
    None when they pass, else doctest's report."""
    test = doctest.DocTestParser().get_doctest(source, globs, name, filename, lineno)
    report = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=DOCTEST_FLAGS)
    with _in_scratch():
        runner.run(test, out=report.write, clear_globs=False)
    globs.update(test.globs)  # the doctest ran in a copy of the namespace
    return report.getvalue() if runner.failures else None


def page_namespace(docname: str) -> dict:
    """Where a page's blocks run, one after the other."""
    return {"__name__": f"docs.{docname.replace('/', '.')}"}


def docstring_namespace(name: str) -> dict:
    """Where one docstring's Examples run: nothing imported, as in a fresh interpreter."""
    return {"__name__": name.rpartition(".")[0]}


def run_block(source: str, where: str, globs: dict, filename: str, lineno: int = 0) -> str | None:
    """One code block of a page: a doctest if it starts with ``>>>``, else a script."""
    if source.lstrip().startswith(">>>"):
        return run_doctest(source, where, globs, filename, lineno)
    return run_script(source, globs, where)


def run_script(source: str, globs: dict, filename: str) -> str | None:
    """Execute a block of code in ``globs``; None when it runs, else the traceback."""
    printed = io.StringIO()
    try:
        code = compile(source, filename, "exec")
        with _in_scratch(), contextlib.redirect_stdout(printed):
            exec(code, globs)
    except BaseException:  # noqa: BLE001 (SystemExit from an example is a failure too)
        return traceback.format_exc(limit=-6)
    return None


def _language(node: nodes.literal_block) -> str:
    return (node.get("language") or "").lower()


def _is_example(node: nodes.literal_block) -> bool:
    # a literalinclude (a script of examples/, which the test suite runs) names its file
    return _language(node) in PYTHON_LANGUAGES and not node.get("source")


def run_page_examples(app, doctree: nodes.document) -> None:
    """``doctree-read``: run the page's code blocks in order, in one namespace."""
    docname = app.env.docname
    globs = page_namespace(docname)
    simulated: list[str] = []
    for number, node in enumerate(doctree.findall(nodes.literal_block), start=1):
        if not _is_example(node):
            continue
        source = node.astext()
        classes = node.get("classes", [])
        where = f"{docname} (code block {number})"
        if CUDA_SIMULATOR in classes:
            simulated.append(source)
            continue
        if NEEDS_GPU in classes:
            try:
                compile(_as_script(source), where, "exec")
            except SyntaxError as error:
                logger.warning("GPU example does not compile: %s", error, location=node)
            continue
        started = time.perf_counter()
        failure = run_block(source, where, globs, docname, node.line or 0)
        _report(failure, where, started, node)
    if simulated:
        app.env.centerkern_simulated_pages[docname] = simulated


def _as_script(source: str) -> str:
    if not source.lstrip().startswith(">>>"):
        return source
    return "\n".join(example.source for example in doctest.DocTestParser().get_examples(source))


def _report(failure: str | None, where: str, started: float, location) -> None:
    elapsed = time.perf_counter() - started
    if failure is not None:
        logger.warning("example failed: %s\n%s", where, failure, location=location)
    elif elapsed > SLOW_EXAMPLE_S:
        logger.info("slow example: %s took %.1f s", where, elapsed)


def run_docstring_examples(app, what, name, obj, options, lines) -> None:
    """``autodoc-process-docstring`` (before numpydoc rewrites the lines): run the Examples."""
    documented = app.env.centerkern_documented
    documented[name] = app.env.docname
    if what in ("function", "class", "exception", "method"):
        _check_sections(name, obj, lines)
    if what == "data" and _says_nothing_of_its_own(obj, lines):
        logger.warning("%s has no doc comment (a '#:' comment above its assignment in %s)", name,
                       name.rpartition(".")[0])
    text = "\n".join(lines)
    if ">>>" not in text:
        return
    if name.startswith(tuple(app.config.executed_examples_simulated_modules)):
        app.env.centerkern_simulated_docstrings[name] = text
        return
    started = time.perf_counter()
    failure = run_doctest(text, name, docstring_namespace(name), name)
    _report(failure, f"the Examples of {name}", started, None)


def _check_sections(name: str, obj, lines: list[str]) -> None:
    """The sections a public callable must have: Examples; Parameters and Raises where it takes
    arguments; Returns for a function not annotated ``-> None``. (numpydoc's validation checks
    that the Parameters match the signature; it cannot inspect a hypothesis strategy, whose
    source is hidden, and has no check for Raises, hence this one check of every section.)"""
    required = ["Examples"]
    # an exception is what is raised; a record of results (named tuple, dataclass) checks nothing
    is_record = inspect.isclass(obj) and (issubclass(obj, (BaseException, tuple)) or dataclasses.is_dataclass(obj))
    with contextlib.suppress(TypeError, ValueError):
        signature = inspect.signature(obj)
        if not is_record and any(p not in ("self", "cls") for p in signature.parameters):
            required += ["Parameters", "Raises"]
        if not inspect.isclass(obj) and signature.return_annotation not in (None, "None"):
            required.append("Returns")
    headers = {line.strip() for line in lines}
    for section in required:
        if section not in headers:
            logger.warning("the docstring of %s has no %s section", name, section)


def _says_nothing_of_its_own(value, lines: list[str]) -> bool:
    # autodoc falls back to the docstring of the value's type ("Built-in immutable sequence.")
    text = "\n".join(lines).strip()
    return not text or text == (inspect.getdoc(type(value)) or "").strip()


def run_simulated_examples(app, env) -> None:
    """``env-updated``: what needs a GPU, in one child process under Numba's CUDA simulator."""
    pages, docstrings = env.centerkern_simulated_pages, env.centerkern_simulated_docstrings
    if not pages and not docstrings:
        return
    work = {"pages": pages, "docstrings": docstrings}
    child_env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, str(_CHILD)], input=json.dumps(work), capture_output=True,
                               text=True, env=child_env, cwd=_Scratch.directory(), timeout=600)
    if completed.returncode != 0:
        logger.warning("the examples under the CUDA simulator did not run:\n%s", completed.stderr[-4000:])
        return
    for source, where, failure in json.loads(completed.stdout.splitlines()[-1]):
        page = source if source in pages else env.centerkern_documented.get(source)
        logger.warning("example failed under the CUDA simulator: %s\n%s", where, failure, location=page)
    logger.info("examples under the CUDA simulator: %d pages, %d docstrings, %.1f s", len(pages), len(docstrings),
                time.perf_counter() - started)


def check_every_public_name(app, env) -> None:
    """``env-check-consistency``: each name of each public module's ``__all__`` is documented
    (under its own module's path, or, for a re-export, wherever the object itself is)."""
    documented = env.centerkern_documented
    documented_objects = set()
    for name in documented:
        module_name, _, attribute = name.rpartition(".")
        with contextlib.suppress(ImportError, AttributeError):
            documented_objects.add(id(getattr(importlib.import_module(module_name), attribute)))
    for module_name in app.config.executed_examples_public_modules:
        module = importlib.import_module(module_name)
        if not hasattr(module, "__all__"):
            logger.warning("public module %s has no __all__: its public names are not known", module_name)
            continue
        for attribute in module.__all__:
            full = f"{module_name}.{attribute}"
            value = getattr(module, attribute)
            re_export = inspect.isclass(value) or inspect.isfunction(value)
            if full not in documented and not (re_export and id(value) in documented_objects):
                logger.warning("public name %s is not in the API reference", full)


def _fresh_records(app, env, docnames) -> None:
    # the records of the pages about to be read again are dropped and made anew
    for record in ("centerkern_simulated_pages", "centerkern_simulated_docstrings", "centerkern_documented"):
        if not hasattr(env, record):
            setattr(env, record, {})
    for docname in docnames:
        env.centerkern_simulated_pages.pop(docname, None)
        for name, page in list(env.centerkern_documented.items()):
            if page == docname:
                del env.centerkern_documented[name]
                env.centerkern_simulated_docstrings.pop(name, None)


def setup(app):
    # the modules whose __all__ the API reference must cover, and those whose docstrings' examples
    # run on Numba device arrays (in the simulator's child process)
    app.add_config_value("executed_examples_public_modules", (), "env")
    app.add_config_value("executed_examples_simulated_modules", (), "env")
    app.connect("env-before-read-docs", _fresh_records)
    app.connect("doctree-read", run_page_examples)
    # before numpydoc (priority 500) turns the docstring into reStructuredText
    app.connect("autodoc-process-docstring", run_docstring_examples, priority=100)
    app.connect("env-updated", run_simulated_examples)
    app.connect("env-check-consistency", check_every_public_name)
    return {"parallel_read_safe": False, "parallel_write_safe": True, "env_version": 1}
