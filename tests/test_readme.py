"""The README is the front door: its Python examples run as written, and its links lead somewhere.

(The documentation site runs its own examples while it is built: ``make docs``.)
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_the_readme_python_examples_run_in_order():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) >= 5, "the README shows one example per framework"
    namespace: dict = {"__name__": "readme"}
    for number, block in enumerate(blocks, start=1):
        exec(compile(block, f"README.md (python block {number})", "exec"), namespace)
    result = namespace["result"]
    assert result.centers is namespace["centers"] and result.grad.shape == (1024, 512)
    assert namespace["embeddings"].grad is not None
    assert namespace["grad"].shape == (8, 4)


@pytest.mark.parametrize("target", sorted(set(re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README))))
def test_the_readme_links_lead_to_files(target):
    assert (ROOT / target).exists(), target
