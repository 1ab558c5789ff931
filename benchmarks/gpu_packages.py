"""Choose which carried wheels a GPU machine needs, and install them beside its own packages.

    python3 benchmarks/gpu_packages.py WHEEL_DIR TARGET_DIR

A machine with a GPU comes with its own Python packages and nothing can be installed there from
a registry. This keeps its packages wherever they do, and installs a carried wheel (into
TARGET_DIR, to be put first on PYTHONPATH) only where the machine's version is older than the one
carried and the wheel's own requirements are met by what is there: llvmlite, for one, is too
large to carry, so a newer numba is installed only over a matching llvmlite. It prints what it
found and chose, and exits 0 whenever the chosen set imports (even with nothing installed).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version


def installed_version(name: str) -> Version | None:
    try:
        return Version(metadata.version(name))
    except metadata.PackageNotFoundError:
        return None


def wheel_requirements(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(name).decode().splitlines()
    requirements = [Requirement(line.split(":", 1)[1].strip()) for line in lines if line.startswith("Requires-Dist:")]
    return [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]


def main(wheel_dir: Path, target: Path) -> int:
    carried = {}
    for wheel in sorted(wheel_dir.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        carried[canonicalize_name(name)] = (Version(str(version)), wheel)
    # the versions the process will see: the machine's, replaced by each wheel chosen below
    seen = {name: installed_version(name) for name in ["numpy", "llvmlite", "numba", "numba-cuda", *carried]}

    def present(name: str) -> Version | None:
        name = canonicalize_name(name)
        if name not in seen:
            seen[name] = installed_version(name)
        return seen[name]

    chosen = []
    # numba before numba-cuda: the latter's requirement on numba depends on the former's choice
    for name in sorted(carried, key=lambda n: n != "numba"):
        version, wheel = carried[name]
        if seen.get(name) is not None and seen[name] >= version:
            print(f"{name}: the machine's {seen[name]} (carried {version} not needed)")
            continue
        unmet = [
            str(r) for r in wheel_requirements(wheel)
            if present(r.name) is None or not r.specifier.contains(present(r.name), prereleases=True)
        ]
        if unmet:
            print(f"{name}: the machine's {seen.get(name)}; carried {version} not installed, needs {', '.join(unmet)}")
            continue
        print(f"{name}: carried {version} over the machine's {seen.get(name)}")
        chosen.append(wheel)
        seen[name] = version
    if chosen:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
             "--no-cache-dir", "--upgrade", "--target", str(target), *map(str, chosen)],
            check=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
