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


def test_the_readme_headline_is_the_committed_run():
    """The headline table's figures are those of the committed result it names."""
    import json

    (date,) = set(re.findall(r"the full run of (\d{4}-\d{2}-\d{2})", README))
    size = json.loads((ROOT / "benchmarks" / "results" / f"bench-{date}.json").read_text())["sizes"]["L"]
    assert (size["B"], size["D"], size["K"]) == (8192, 512, 100_000)
    rows = re.findall(r"^\| `(\w+)` \| ([\d.]+) ms \| ([\d.]+) ms \(([\d.]+)x\) \| ([\d.]+) \|$", README, re.M)
    assert [row[0] for row in rows] == ["facenet", "wen", "pytorch"]
    for rule, ours, eager, speedup, floor in rows:
        seconds = size["median_seconds"][f"step {rule}"]
        centerkern, torch_eager, copy = (seconds[k] for k in ("centerkern numba", "torch eager", "copy floor (same bytes)"))
        assert float(ours) == round(centerkern * 1e3, 1), rule
        assert float(eager) == round(torch_eager * 1e3, 1), rule
        assert float(speedup) == round(torch_eager / centerkern, 1), rule
        assert float(floor) == round(centerkern / copy, 2 if float(floor) < 10 else 1), rule
