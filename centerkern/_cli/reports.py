"""What every benchmark report starts with and how it is written: where, when and with what it
was measured, and an earlier version of the package to measure beside this one.

Below the benchmarks (``_bench``, ``_first_call`` and the scripts under ``benchmarks/``), which
all import it; it imports none of them.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import platform
import subprocess
import tarfile
from datetime import datetime, timezone
from pathlib import Path

import numba
import numpy as np

from .. import __version__

_CHECKOUT = Path(__file__).resolve().parents[2]  # the checkout holding centerkern/, when there is one


def _versions() -> dict:
    versions = {"python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__,
                "centerkern": __version__}
    distributions = {"torch": ["torch"], "jax": ["jax"], "tensorflow": ["tensorflow", "tensorflow-cpu"],
                     "numpy_groupies": ["numpy-groupies"]}
    for name, candidates in distributions.items():
        versions[name] = None
        for distribution in candidates:
            try:
                versions[name] = importlib.metadata.version(distribution)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def _commit() -> dict:
    """The git commit of the package measured, where it runs from a checkout: the version
    number alone does not tell two commits of one development version apart. Empty elsewhere
    (an installed package, no git)."""
    root = _CHECKOUT
    if not (root / ".git").exists():
        return {}
    try:
        def git(*arguments: str) -> str:
            return subprocess.run(["git", *arguments], cwd=root, capture_output=True, text=True, check=True,
                                  timeout=30).stdout.strip()

        commit = git("rev-parse", "--short", "HEAD")
        # what is measured is the package and the benchmarks' code, not the results beside them
        changed = git("status", "--porcelain", "--untracked-files=no", "--", "centerkern", "benchmarks",
                      ":(exclude)benchmarks/results")
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": commit, "uncommitted_changes": bool(changed)}


def provenance() -> dict:
    """Where, when and with what a result was measured: every report of the benchmarks starts
    with it, so that numbers from different machines or versions are not compared unknowingly."""
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "platform": platform.platform(), "cpus": os.cpu_count(), "versions": _versions(), **_commit()}


def export_revision(revision: str, directory: Path, name: str = "centerkern") -> Path:
    """The ``centerkern`` package of git ``revision`` of this checkout, written into ``directory``
    as package ``name``: an earlier version to measure beside this one. Returns its parent."""
    root = _CHECKOUT
    archive = subprocess.run(["git", "archive", "--format=tar", revision, "centerkern"], check=True,
                             capture_output=True, cwd=root).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(directory, filter="data")
    if name != "centerkern":
        (directory / "centerkern").rename(directory / name)
    return directory


def write_report(report: dict, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print(f"results: {output}")
