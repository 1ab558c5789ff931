"""The site's example runner fails the build for what it is there to catch.

``make docs`` builds the real site; here a small site of its own shows that a failing example
(in a guide, in a docstring, under the CUDA simulator) or a GPU example that does not compile
fails a build with warnings as errors, as does a public name left out of the API reference, and
that the same pages with working examples build; and that a script of ``examples/`` shown with
its output (``{example-output}``) is run, its output shown, and fails the build when it fails.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("sphinx")
pytest.importorskip("myst_parser")

EXTENSIONS = Path(__file__).resolve().parent.parent / "docs" / "_ext"

CONF = f"""
import sys
sys.path.insert(0, {str(EXTENSIONS)!r})
sys.path.insert(0, {{here!r}})
extensions = ["sphinx.ext.autodoc", "myst_parser", "executed_examples"]
exclude_patterns = ["_build"]
executed_examples_public_modules = ("sample_module",)
"""

MODULE = '''
__all__ = ["double"{more_names}]


def double(x):
    """Twice ``x``.

    Parameters
    ----------
    x : int
        A number.

    Returns
    -------
    int
        ``2 * x``.

    Raises
    ------
    TypeError
        For what cannot be doubled.

    Examples
    --------
    >>> from sample_module import double
    >>> double(2)
    {answer}
    """
    return 2 * x
'''

PAGE = """
# A page

```python
numbers = [1, 2, 3]
```

```pycon
>>> sum(numbers)
{total}
```

```{{code-block}} python
:class: needs-gpu

{gpu_line}
```

```{{code-block}} pycon
:class: needs-gpu cuda-simulator

>>> from numba import cuda
>>> cuda.to_device([1.0, 2.0]).copy_to_host().tolist()
{simulated}
```

```{{eval-rst}}
.. autofunction:: sample_module.double
```
"""

GOOD = {"total": "6", "gpu_line": "import torch", "simulated": "[1.0, 2.0]", "answer": "4", "more_names": ""}


def build(tmp_path: Path, **changes: str) -> subprocess.CompletedProcess:
    fields = {**GOOD, **changes}
    (tmp_path / "conf.py").write_text(CONF.format(here=str(tmp_path)))
    (tmp_path / "index.md").write_text(PAGE.format(**fields))
    module = MODULE.format(answer=fields["answer"], more_names=fields["more_names"])
    if fields["more_names"]:
        module += "\n\ndef triple(x):\n    return 3 * x\n"
    (tmp_path / "sample_module.py").write_text(module)
    return subprocess.run([sys.executable, "-m", "sphinx", "-b", "html", "-E", "-W", "-q", str(tmp_path),
                           str(tmp_path / "_build")], capture_output=True, text=True, timeout=300)


def test_working_examples_build(tmp_path):
    built = build(tmp_path)
    assert built.returncode == 0, built.stderr


@pytest.mark.parametrize("change, message", [
    ({"total": "7"}, "example failed: index"),
    ({"answer": "5"}, "example failed: the Examples of sample_module.double"),
    ({"simulated": "[1.0, 3.0]"}, "example failed under the CUDA simulator: index"),
    ({"gpu_line": "import torch as"}, "GPU example does not compile"),
    ({"more_names": ', "triple"'}, "public name sample_module.triple is not in the API reference"),
], ids=["guide", "docstring", "simulated", "gpu-code", "public-name"])
def test_a_broken_example_fails_the_build(tmp_path, change, message):
    built = build(tmp_path, **change)
    assert built.returncode != 0
    assert message in built.stderr, built.stderr


SCRIPT_CONF = f"""
import sys
sys.path.insert(0, {str(EXTENSIONS)!r})
extensions = ["myst_parser", "example_scripts"]
exclude_patterns = ["_build", "examples"]
example_scripts_root = "."
"""

SCRIPT_PAGE = """
# Scripts

```{{example-output}} examples/hello.py --name {name}
```
"""

SCRIPT = """
import argparse
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--name")
name = parser.parse_args().name
if name == "nobody":
    sys.exit("no one to greet")
print(f"hello, {name}")
"""


def build_with_script(tmp_path: Path, name: str) -> subprocess.CompletedProcess:
    (tmp_path / "conf.py").write_text(SCRIPT_CONF)
    (tmp_path / "index.md").write_text(SCRIPT_PAGE.format(name=name))
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "hello.py").write_text(SCRIPT)
    return subprocess.run([sys.executable, "-m", "sphinx", "-b", "html", "-E", "-W", "-q", str(tmp_path),
                           str(tmp_path / "_build")], capture_output=True, text=True, timeout=300)


def test_a_script_runs_and_its_output_is_shown(tmp_path):
    built = build_with_script(tmp_path, "reader")
    assert built.returncode == 0, built.stderr
    page = re.sub(r"<[^>]+>", "", (tmp_path / "_build" / "index.html").read_text())  # the text, highlighted or not
    assert "python examples/hello.py --name reader" in page  # the command
    assert "hello, reader" in page  # and what it printed


def test_a_failing_script_fails_the_build(tmp_path):
    built = build_with_script(tmp_path, "nobody")
    assert built.returncode != 0
    assert "example script failed: python examples/hello.py --name nobody exited with status 1" in built.stderr
    assert "no one to greet" in built.stderr
