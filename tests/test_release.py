"""The package as it is released: the test environment's lock against pyproject.toml's ranges, and
the wheel installed as a user installs it (not editable, read-only, core dependencies only)."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
LOCK = ROOT / "requirements" / "test.lock"

# the extras a user installs; `test` and `docs` are this repository's own environments
USER_EXTRAS = ("cuda", "torch", "jax", "tensorflow", "dask", "examples", "bench", "testing")


def pins_in(path: Path) -> dict[str, Version]:
    """The exact pins (``name==version``) of a requirements file, by canonical name."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, separator, version = line.partition("==")
        assert separator and version, f"{path.name}: {line!r} is not an exact pin (name==version)"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def locked_versions() -> dict[str, Version]:
    """The lock's pins, by canonical name."""
    return pins_in(LOCK)


def requirements_of(extra: str | None) -> list[Requirement]:
    """``dependencies`` (extra None) or one extra's requirements, the project's own extras
    included by reference (``centerkern[torch,jax]``) expanded."""
    listed = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    found = []
    for text in listed:
        requirement = Requirement(text)
        if canonicalize_name(requirement.name) == "centerkern":
            for included in sorted(requirement.extras):
                found += requirements_of(included)
        else:
            found.append(requirement)
    return found


def test_every_requirement_of_the_tests_is_locked_within_its_range():
    pins = locked_versions()
    outside = []
    build_backend = [Requirement(text) for text in PYPROJECT["build-system"]["requires"]]
    for requirement in requirements_of(None) + requirements_of("test") + build_backend:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is required but {LOCK.name} has no pin for it: run `make lock`"
        if not requirement.specifier.contains(pins[name], prereleases=True):
            outside.append(f"{requirement} but the lock has {pins[name]}")
    assert not outside, f"{LOCK.name} and pyproject.toml disagree (run `make lock`): " + "; ".join(outside)


def test_the_test_extra_holds_every_user_extra():
    # the lock is resolved from `test`: an extra left out of it would be neither locked nor tested
    included = set()
    for text in PROJECT["optional-dependencies"]["test"]:
        requirement = Requirement(text)
        if canonicalize_name(requirement.name) == "centerkern":
            included |= requirement.extras
    assert set(USER_EXTRAS) <= included, sorted(set(USER_EXTRAS) - included)


def test_what_a_user_installs_is_a_range_never_one_version():
    user_requirements = [str(r) for r in requirements_of(None)]
    for extra in USER_EXTRAS:
        user_requirements += [str(r) for r in requirements_of(extra)]
    pinned = [text for text in user_requirements if "==" in text or "===" in text]
    assert not pinned, f"exact versions in what a user installs: {pinned}"
    unbounded = [text for text in user_requirements if not Requirement(text).specifier]
    assert not unbounded, f"requirements without a tested lower bound: {unbounded}"


def test_make_test_oldest_installs_the_lower_bounds():
    oldest = pins_in(ROOT / "requirements" / "oldest.txt")
    lowest = {}
    for requirement in requirements_of(None) + requirements_of("testing") + requirements_of("torch"):
        (bound,) = [s for s in requirement.specifier if s.operator == ">="]
        lowest[canonicalize_name(requirement.name)] = Version(bound.version)
    assert {name: oldest.get(name) for name in lowest} == lowest
    assert oldest[canonicalize_name("pytest")] == locked_versions()[canonicalize_name("pytest")]


def test_the_environment_is_the_lock():
    """`make install` installs the lock's versions: every locked package present here is at its pin."""
    differing = []
    for name, version in locked_versions().items():
        try:
            installed = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            continue  # a lock made on another platform may hold packages that this one skips
        if installed != version:
            differing.append(f"{name} {installed} (the lock: {version})")
    assert not differing, "installed versions differ from the lock: " + ", ".join(differing)


def _imported_top_level_modules(paths: list[Path]) -> set[str]:
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_the_lock_covers_every_package_the_repository_imports():
    sources = [p for folder in ("centerkern", "tests", "benchmarks", "examples", "docs")
               for p in (ROOT / folder).rglob("*.py") if "_build" not in p.parts]
    local = {p.stem for p in sources} | {p.name for p in (ROOT / "tests").iterdir() if p.is_dir()}
    distributions = importlib.metadata.packages_distributions()
    pins = locked_versions()
    unlocked = []
    for module in sorted(_imported_top_level_modules(sources)):
        if module in sys.stdlib_module_names or module in local or module == "centerkern":
            continue
        if module == "cupy":
            continue  # needs a GPU: installed on the device machine, never in the CPU tests
        owners = {canonicalize_name(d) for d in distributions.get(module, [])}
        if not owners & set(pins):
            unlocked.append(f"{module} ({', '.join(sorted(owners)) or 'not installed'})")
    assert not unlocked, f"imported but not in {LOCK.name}: {unlocked}"


# --- the wheel, installed as a user installs it ---------------------------------------------

CHECK_CALL = """
import errno, os, numpy as np, centerkern
try:  # the installation is read-only, for this user too
    open(os.path.join(os.path.dirname(centerkern.__file__), "written"), "w")
    raise SystemExit("the installed package can be written to")
except OSError as error:
    assert error.errno in (errno.EACCES, errno.EROFS, errno.EPERM), error
features = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], np.float32)
labels = np.array([0, 1, 0])
centers = np.zeros((2, 2), np.float32)
for dtype in (np.float32, np.float64):
    result = centerkern.center_loss(features.astype(dtype), labels, centers.astype(dtype), 0.5,
                                    rule="wen", backend="numba")
    expected = centerkern.center_loss(features.astype(dtype), labels, centers.astype(dtype), 0.5,
                                      rule="wen", backend="numpy")
    assert np.allclose(result.centers, expected.centers) and abs(result.loss - expected.loss) < 1e-6
print(centerkern.__file__)
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The sdist and the wheel that `python -m build` makes (the wheel from the sdist)."""
    out = tmp_path_factory.mktemp("dist")
    # PIP_CONSTRAINT reaches the isolated environments the builds run in: the lock's setuptools
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], check=True,
                   capture_output=True, text=True, env={**os.environ, "PIP_CONSTRAINT": str(LOCK)})
    (wheel,) = out.glob("centerkern-*.whl")
    (sdist,) = out.glob("centerkern-*.tar.gz")
    return sdist, wheel


def test_the_wheel_carries_the_license_the_types_and_the_metadata(built):
    import centerkern

    _, wheel = built
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = f"centerkern-{centerkern.__version__}.dist-info"
        metadata = archive.read(f"{info}/METADATA").decode()
        assert f"{info}/licenses/LICENSE" in names
        assert "MIT License" in archive.read(f"{info}/licenses/LICENSE").decode()
    assert "centerkern/py.typed" in names
    assert f"Version: {centerkern.__version__}\n" in metadata
    assert "License-Expression: MIT\n" in metadata
    assert f"Requires-Python: {PROJECT['requires-python']}\n" in metadata
    assert "Classifier: Typing :: Typed\n" in metadata
    assert not [n for n in names if n.startswith(("tests/", "docs/", "benchmarks/"))]


class InstalledAsAUser:
    """A fresh virtual environment holding the wheel and the core dependencies only, with its
    site-packages read-only: without write permission, and, where the tests run as root (whom
    permissions do not stop), mounted read-only in a mount namespace of the process's own."""

    def __init__(self, wheel: Path):
        self.root = Path(tempfile.mkdtemp(prefix="centerkern-installed-"))
        venv = self.root / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        self.python = venv / "bin" / "python"
        subprocess.run([str(self.python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        "--constraint", str(LOCK), str(wheel)], check=True, capture_output=True, text=True)
        (self.site_packages,) = venv.glob("lib/python*/site-packages")
        self._set_writable(False)
        self.home = self.root / "home"
        self.home.mkdir()
        self.cache = self.home / ".cache" / "centerkern"

    def _set_writable(self, writable: bool) -> None:
        for path in [self.site_packages, *self.site_packages.rglob("*")]:
            if not path.is_symlink():
                mode = path.stat().st_mode
                path.chmod(mode | 0o200 if writable else mode & ~0o222)

    def run(self, *arguments: str) -> str:
        """stdout and stderr of the environment's python with ``arguments``, which must succeed."""
        command = [str(self.python), *arguments]
        if os.geteuid() == 0:
            read_only = f"mount --bind {self.site_packages} {self.site_packages} && " \
                        f"mount -o remount,ro,bind {self.site_packages} && exec \"$@\""
            command = ["unshare", "--mount", "sh", "-c", read_only, "sh", *command]
        environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.home),
                       "XDG_CACHE_HOME": str(self.home / ".cache"), "NUMBA_NUM_THREADS": "2"}
        done = subprocess.run(command, env=environment, cwd=self.home, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    def cache_files(self) -> dict[str, int]:
        return {str(p.relative_to(self.cache)): p.stat().st_mtime_ns for p in self.cache.rglob("*") if p.is_file()}

    def remove(self) -> None:
        self._set_writable(True)
        shutil.rmtree(self.root)


@pytest.fixture(scope="module")
def installed(built):
    environment = InstalledAsAUser(built[1])
    yield environment
    environment.remove()


def test_the_installed_wheel_runs_read_only_and_caches_its_kernels_per_user(installed):
    # only the core: a user who installs centerkern alone gets numpy and numba, nothing else
    listed = installed.run("-m", "pip", "list", "--format=freeze", "--disable-pip-version-check")
    names = {canonicalize_name(line.split("==")[0]) for line in listed.splitlines()}
    assert names - {"pip", "setuptools"} == {"centerkern", "numpy", "numba", "llvmlite"}, names

    where = installed.run("-c", CHECK_CALL).strip().splitlines()[-1]
    assert Path(where).is_relative_to(installed.site_packages), where  # the wheel, not this checkout
    assert not list(installed.site_packages.rglob("*.nbi")), "a kernel was cached inside site-packages"
    assert installed.cache_files(), f"nothing cached in the user cache {installed.cache}"

    compiled = installed.run("-m", "centerkern", "compile")
    assert "(user cache)" in compiled, compiled

    # a second process finds every kernel in the cache: it says so, and writes nothing
    before = installed.cache_files()
    again = installed.run("-m", "centerkern", "compile", "--jobs", "1")
    entries = [line for line in again.splitlines() if line.startswith("[")]
    assert entries and all(line.endswith("float32 cached, float64 cached") for line in entries), again
    installed.run("-c", CHECK_CALL)
    assert installed.cache_files() == before, "a second process compiled and wrote to the cache"
