"""How the numba backend's kernels are compiled: when a call first needs them, once per float
dtype, and cached on disk wherever a cache can be written.

A first call used to compile every pass of every layout and regime for its dtype, and again for
each new memory layout (about 25 s on a 2-core machine). Three rules keep it to what the call runs:

- **Entry points.** Python calls a few ``Entry`` functions only (``step_serial``,
  ``step_parallel``, ``gather_rows``, ``fill_zeros``). Each is compiled for one explicit
  signature per float dtype, on first use: arrays C-contiguous, inputs typed read-only. A call
  with writable inputs is converted to that signature by Numba's dispatcher (no compile), and the
  backend hands over C-contiguous arrays only (``driver`` copies the rare strided one), so
  no other memory layout or label dtype ever compiles again.
- **One cache file per entry point.** Only entry points are cached: a cached entry holds the
  machine code of everything it calls, so a warm process loads one file per entry it uses and
  compiles nothing. Functions below the entries are compiled inside the process that needs
  them. (Caching them too would let two processes that compile different entries at once, as
  ``python -m centerkern compile`` does, write one index file from two sides.)
- **A cache that works where the package is installed.** In order: ``CENTERKERN_CACHE_DIR``,
  Numba's ``NUMBA_CACHE_DIR``, the package's own ``__pycache__`` (Numba's default), then the
  platform's per-user cache directory (a read-only installation). Where none can be written,
  kernels are compiled in memory each process, and a cache that fails to read or write is
  reported once, never raised: no call fails because of the cache. A cached entry is valid for
  the exact sources of this package (``sources_stamp``), not only its own file's.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import threading
import types
import warnings
from pathlib import Path
from typing import Callable

import numba
import numpy as np
from numba.core import caching

from ..._core.interop import FLOAT_DTYPES

# Sums may be reordered (so that LLVM vectorizes them: the order is still fixed at compile time,
# the same for any thread count) and a multiply-add fused: the arithmetic on float32 data is
# bound by the conversions to and from float64, and fusing measured 12% faster. No flag that
# assumes finite values: NaN and inf propagate as in the reference.
FAST_MATH = {"reassoc", "contract"}

def _numba_class(name: str):
    """A class of ``numba.core.caching`` under its public name (Numba 0.68 on) or its earlier
    private one."""
    found = getattr(caching, name, None) or getattr(caching, "_" + name, None)
    if found is None:
        raise ImportError(f"numba.core.caching has no {name}: this Numba is not supported")
    return found


def user_cache_root() -> str:
    """The platform's per-user cache directory for centerkern."""
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.join(os.path.expanduser("~"), "AppData", "Local")
        return os.path.join(base, "centerkern", "Cache")
    if sys.platform == "darwin":
        return os.path.join(os.path.expanduser("~"), "Library", "Caches", "centerkern")
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                        "centerkern")


_PACKAGE = Path(__file__).parents[2]
# Every module whose code a cached kernel holds: this backend's, and those of the XLA handler,
# which compiles this backend's step into a cfunc with the rules' arithmetic
# (centerkern._adapters.xla_native).
KERNEL_SOURCES = (*sorted(Path(__file__).parent.glob("*.py")), _PACKAGE / "_core" / "rules.py",
                  _PACKAGE / "_adapters" / "xla_ffi.py", _PACKAGE / "_adapters" / "xla_native.py")


@functools.lru_cache(maxsize=None)
def sources_stamp(sources: tuple[Path, ...] = KERNEL_SOURCES) -> str:
    """A hash of every module a cached kernel was compiled from (``KERNEL_SOURCES``). Numba's own
    stamp covers the entry's file only, so an entry cached before a change to the functions it
    calls, in another file, would be loaded as if current."""
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.relative_to(_PACKAGE).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class _WholePackageStamp:
    def get_source_stamp(self):
        return sources_stamp()


def _with_package_stamp(base, described: str):
    """Numba's locator ``base``, stamped with the whole package."""
    return type(base.__name__.lstrip("_"), (_WholePackageStamp, base), {"description": described})


def _locator_under(root_of: Callable[[], str | None], described: str):
    """A locator that keeps a kernel's files under ``root_of()`` (None: not used)."""

    class Locator(_WholePackageStamp, _numba_class("UserWideCacheLocator")):
        description = described

        def __init__(self, py_func, py_file):
            super().__init__(py_func, py_file)
            self._cache_path = os.path.join(root_of(), self.get_suitable_cache_subpath(py_file))

        @classmethod
        def from_function(cls, py_func, py_file):
            return super().from_function(py_func, py_file) if root_of() else None

    return Locator


_ExplicitLocator = _locator_under(lambda: os.environ.get("CENTERKERN_CACHE_DIR") or None, "CENTERKERN_CACHE_DIR")
_NumbaDirLocator = _with_package_stamp(_numba_class("UserProvidedCacheLocator"), "NUMBA_CACHE_DIR")
_InTreeLocator = _with_package_stamp(_numba_class("InTreeCacheLocator"), "next to the package")
_UserLocator = _locator_under(user_cache_root, "user cache")

LOCATORS = (_ExplicitLocator, _NumbaDirLocator, _InTreeLocator, _UserLocator)


class _CacheImpl(_numba_class("CompileResultCacheImpl")):
    _locator_classes = list(LOCATORS)


_cache_problems: list[str] = []


def _report_cache_problem(problem: str) -> None:
    if problem not in _cache_problems:
        _cache_problems.append(problem)
        warnings.warn(f"centerkern: {problem}; kernels are compiled in memory instead", RuntimeWarning, stacklevel=4)


class _Cache(caching.FunctionCache):
    """Numba's per-function cache with centerkern's locators, that reports an unreadable or
    unwritable cache instead of failing the call."""

    _impl_class = _CacheImpl

    def load_overload(self, sig, target_context):
        try:
            return super().load_overload(sig, target_context)
        except (OSError, EOFError, ValueError) as error:  # unreadable or truncated files
            _report_cache_problem(f"the kernel cache in {self.cache_path} cannot be read ({error})")
            return None

    def save_overload(self, sig, data):
        try:
            super().save_overload(sig, data)
        except OSError as error:
            _report_cache_problem(f"the kernel cache in {self.cache_path} cannot be written ({error})")


def cache_location(py_func) -> tuple[str | None, str]:
    """(directory, how it was chosen) of the cache for ``py_func``, or (None, why there is none)."""
    try:
        impl = _CacheImpl(py_func)
    except RuntimeError:
        tried = ", ".join(locator.description for locator in LOCATORS)
        return None, f"none writable ({tried} tried); kernels compile in memory in each process"
    return impl.locator.get_cache_path(), impl.locator.description


def renamed(function, name: str):
    """``function`` as a function of its own ``name``: the same code compiled twice (once with
    parallel=True) is cached and loaded as two functions, since Numba names a function's cache
    files after it."""
    copy = types.FunctionType(function.__code__, function.__globals__, name)
    copy.__qualname__ = name
    return copy


def helper(function=None, **options):
    """``numba.njit`` for the functions below the entry points: compiled when an entry that
    calls them is compiled, never cached on their own (see the module docstring)."""
    if function is None:
        return lambda f: numba.njit(f, **options)
    return numba.njit(function, **options)


class Entry:
    """A kernel that Python calls: compiled for ``signature(dtype)`` when a call first needs that
    float dtype (or loaded from the cache), and never for any other signature.

    ``compiled(dtype)`` returns the Numba dispatcher, ready for arrays of that dtype."""

    def __init__(self, name: str, function, signature: Callable[[np.dtype], object], **options):
        self.name = name
        self.dispatcher = numba.njit(function, **options)
        self._signature = signature
        self._ready: set[np.dtype] = set()
        self._lock = threading.Lock()
        self._cache_checked = False

    def compiled(self, dtype: np.dtype):
        if dtype not in self._ready:
            self._compile(np.dtype(dtype))
        return self.dispatcher

    def is_cached(self, dtype: np.dtype) -> bool:
        """Whether the cache holds this entry for ``dtype`` (loaded now if so), without compiling."""
        with self._lock:
            self._attach_cache()
            signature = self._signature(np.dtype(dtype))
            args = tuple(signature.args)
            if args in self.dispatcher.overloads:
                return True
            return self.dispatcher._cache.load_overload(signature, self.dispatcher.targetctx) is not None

    def _attach_cache(self) -> None:
        # Made on first use, not at import: finding a writable directory touches the disk.
        if self._cache_checked:
            return
        self._cache_checked = True
        try:
            self.dispatcher._cache = _Cache(self.dispatcher.py_func)
        except RuntimeError:  # no directory can be written: compile in memory
            _report_cache_problem("no kernel cache directory can be written")

    def _compile(self, dtype: np.dtype) -> None:
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"the numba kernels take float32 or float64, got {dtype}")
        with self._lock:
            if dtype in self._ready:
                return
            self._attach_cache()
            # Compilation is switched on only here: a call whose arrays differ from the
            # signature (writable where it says read-only) is then converted, not compiled for.
            self.dispatcher.disable_compile(False)
            try:
                self.dispatcher.compile(self._signature(dtype))
            finally:
                if self.dispatcher.signatures:  # Numba refuses to switch off a dispatcher with none
                    self.dispatcher.disable_compile(True)
            self._ready.add(dtype)
