"""The examples that need a GPU, run under Numba's CUDA simulator (a child of the docs build).

Reads ``{"pages": {docname: [block, ...]}, "docstrings": {name: text}}`` as JSON
on stdin; prints, as the last line, a JSON list of ``[page or docstring's name, which example,
report]``, one for each example that failed. The parent
switched the simulator on (``NUMBA_ENABLE_CUDASIM=1``) before this process imported Numba.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from executed_examples import docstring_namespace, page_namespace, run_block, run_doctest  # noqa: E402


def main() -> None:
    work = json.load(sys.stdin)
    failures: list[tuple[str, str, str]] = []
    for docname, blocks in work["pages"].items():
        globs = page_namespace(docname)
        for number, source in enumerate(blocks, start=1):
            where = f"{docname} (simulated block {number})"
            failure = run_block(source, where, globs, docname)
            if failure is not None:
                failures.append((docname, where, failure))
    for name, text in work["docstrings"].items():
        failure = run_doctest(text, name, docstring_namespace(name), name)
        if failure is not None:
            failures.append((name, f"the Examples of {name}", failure))
    print(json.dumps(failures))


if __name__ == "__main__":
    main()
