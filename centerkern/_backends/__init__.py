"""The backends: their names, which of them can run here, and each loaded when a call first needs it.

A backend is a module with the same three functions and signatures (``gather_centers``,
``scatter_sub_update``, ``center_loss_step``), and the same five for ``centerkern.codebooks``
(``assign_codes``, ``class_sums``, ``ema_step``, ``ema_apply``, ``kmeans_update``), which compute,
in place, on arrays that ``centerkern._core.validation`` (or ``_core.codebooks``) has checked:

=========  ==============================  ==================================================
name       module                          what it is
=========  ==============================  ==================================================
``numpy``  ``_backends.numpy_reference``   plain NumPy, the reference the others are tested against
``numba``  ``_backends.numba_cpu``         parallel CPU kernels; its sort checks the labels' range
``cuda``   ``centerkern.cuda``             GPU kernels on the caller's stream (public: ``check_errors``)
=========  ==============================  ==================================================

The host backends also give ``zeros(shape, dtype)``, the allocation the public functions make
in host memory (``HostArrays``); the ``cuda`` backend allocates through its ``DeviceArrays``.
Modules are imported on first use: Numba's parallel target loads with ``numba_cpu``, and
``numba-cuda`` is an optional extra.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

from .._core.errors import BackendUnavailableError

NAMES = ("numpy", "numba", "cuda")
HOST = ("numpy", "numba")  # those that compute on host arrays, as framework callbacks need
CHOICES = ("auto", *NAMES)  # what ``backend=`` accepts; "auto": cuda for device arrays, numba for the rest
_MODULES = {"numpy": "._backends.numpy_reference", "numba": "._backends.numba_cpu", "cuda": ".cuda"}
_PACKAGE = __package__.rpartition(".")[0]  # centerkern (relative names, so that an exported copy loads its own)


@functools.cache
def load(name: str) -> ModuleType:
    """The module of backend ``name`` (one of ``NAMES``). For ``cuda``, ImportError where
    ``numba-cuda`` is not installed (``cuda`` says so); no GPU is needed to load it."""
    return importlib.import_module(_MODULES[name], _PACKAGE)


_ready: list = []  # the cuda module, once it was found ready (a GPU does not go away)


def cuda() -> ModuleType:
    """The ``cuda`` backend, ready to run: else ``BackendUnavailableError`` saying why."""
    if _ready:
        return _ready[0]
    try:
        module = load("cuda")
    except ImportError as error:
        raise BackendUnavailableError(
            f"backend 'cuda' cannot load Numba's CUDA target ({error}); "
            "install the extra: pip install 'centerkern[cuda]'"
        ) from error
    module.require_available()
    _ready.append(module)
    return module


def available() -> tuple[str, ...]:
    """The names of the backends that can run here (see ``centerkern.backends``)."""
    names = ["numpy", "numba"]
    try:
        if load("cuda").is_available():
            names.append("cuda")
    except ImportError:  # numba-cuda is an optional extra
        pass
    return tuple(names)
