"""A script of ``examples/`` run while the site is built, and what it printed shown on the page.

A page asks for it by the command a reader would type, from the repository's root::

    ```{example-output} examples/train_torch_center_loss.py --epochs 5
    ```

and gets that command (``python examples/train_torch_center_loss.py --epochs 5``) and the
script's standard output, as the interpreter that builds the site printed it in a fresh process
run from the repository's root (``example_scripts_root`` in ``conf.py``; by default the parent of
``docs/``), the repository's package first on its path. A script that exits non-zero, or runs
past ``:timeout:`` seconds (default 300), is a build warning with the end of what it wrote to
stderr, so that ``make docs`` (warnings as errors) fails: as for every example on the site, the
page cannot show output that the script no longer prints. The script is a dependency of its page:
editing it runs it again at the next build.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300
STDERR_SHOWN = 4000  # characters of a failed script's stderr in the warning


class ExampleOutputDirective(SphinxDirective):
    """``{example-output} SCRIPT [ARGUMENT ...]``: the command, and what it printed."""

    required_arguments = 1
    optional_arguments = 50  # the script's own arguments
    final_argument_whitespace = False
    has_content = False
    option_spec = {"timeout": directives.positive_int}

    def run(self) -> list[nodes.Node]:
        root = self._root()
        script, *arguments = self.arguments
        path = root / script
        if not path.is_file():
            return self._warn(f"{script}: no such script under {root}")
        self.env.note_dependency(str(path))
        command = shlex.join(["python", script, *arguments])
        timeout = self.options.get("timeout", DEFAULT_TIMEOUT_S)
        started = time.perf_counter()
        outcome = _run(path, arguments, root, timeout)
        elapsed = time.perf_counter() - started
        if isinstance(outcome, str):
            return self._warn(f"{command}: {outcome}")
        if outcome.returncode != 0:
            return self._warn(f"{command} exited with status {outcome.returncode}:\n"
                              f"{outcome.stderr[-STDERR_SHOWN:]}")
        if not outcome.stdout.strip():
            return self._warn(f"{command} printed nothing")
        logger.info("example script: %s ran in %.1f s", command, elapsed)
        shown = nodes.literal_block(command, command, language="bash", classes=["example-command"])
        said = nodes.paragraph("", "", nodes.emphasis("", "What it printed when this page was built:"),
                               classes=["example-output-caption"])
        printed = outcome.stdout.rstrip("\n")
        output = nodes.literal_block(printed, printed, language="text", classes=["example-output"])
        for node in (shown, said, output):
            self.set_source_info(node)
        return [shown, said, output]

    def _root(self) -> Path:
        configured = self.config.example_scripts_root
        srcdir = Path(self.env.srcdir)
        return (srcdir / configured).resolve() if configured else srcdir.parent

    def _warn(self, message: str) -> list[nodes.Node]:
        logger.warning("example script failed: %s", message, location=self.get_location(),
                       type="example-output", subtype="script")
        return []


def _run(path: Path, arguments: list[str], root: Path, timeout: int) -> subprocess.CompletedProcess | str:
    """Run the script in a fresh process of this interpreter; the process, or why it did not end."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    # a session of its own: a script that starts processes (torch.multiprocessing) is stopped whole
    process = subprocess.Popen([sys.executable, str(path), *arguments], cwd=root, env=env, text=True,
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return f"did not finish within {timeout} s (stopped)"
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def setup(app):
    # where the scripts' paths start and where they run: relative to docs/ (default: its parent)
    app.add_config_value("example_scripts_root", None, "env")
    app.add_directive("example-output", ExampleOutputDirective)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
