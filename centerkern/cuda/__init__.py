"""The ``cuda`` backend: Numba CUDA kernels, run on the caller's stream without host waits.

The same three functions as every backend (``gather_centers``, ``scatter_sub_update``,
``center_loss_step``), its codebook functions (``assign_codes``, ``class_sums``, ``ema_apply``,
``ema_step``, ``kmeans_update``), and ``check_errors`` for calls made with ``sync=False``. Each
concern has a module of its own:

* ``kernels``: the ``@cuda.jit`` kernels, and why they are laid out as they are;
* ``views``: device arrays as the kernels see them;
* ``launcher``: compiling a kernel once per signature and launching it with little host work;
* ``pool``: the stream-ordered memory pool of calls on Numba arrays;
* ``memory``: each framework's stream and allocator, for one call's results and its temporary;
* ``arrays``: one call's device arrays (``DeviceArrays``), checked and converted;
* ``record``: the error record of each device, the one thing calls share;
* ``driver``: what one call launches, in which order, on which parts of its temporary;
* ``repeat``: a training loop's calls after its first, checked and planned once;
* ``codebook_kernels``: the kernels of the codebook functions (``centerkern.codebooks``);
* ``codebooks``: their host functions, and one call's arrays as the codebook functions check them.

Each imports only those above it.
"""

from __future__ import annotations

import os

from numba import cuda

from .._core.errors import BackendUnavailableError
from . import repeat
from .arrays import DeviceArrays
from .codebooks import assign_codes, class_sums, ema_apply, ema_step, kmeans_update
from .driver import center_loss_step, check_errors, gather_centers, scatter_sub_update
from .launcher import launch_path

__all__ = ["DeviceArrays", "assign_codes", "center_loss_step", "check_errors", "class_sums", "ema_apply", "ema_step",
           "gather_centers", "is_available", "kmeans_update", "launch_path", "require_available",
           "scatter_sub_update"]


def is_available() -> bool:
    """Whether the ``cuda`` backend can run here.

    True where Numba finds a CUDA GPU and its driver, or runs its CUDA simulator
    (``NUMBA_ENABLE_CUDASIM=1``). It never raises: a broken driver installation reads as "not
    available", and ``require_available`` says why.

    Returns
    -------
    bool
        True where ``backend="cuda"`` can run.

    See Also
    --------
    require_available : The same test, raising where it fails.
    centerkern.backends : The backend names usable on this machine.

    Examples
    --------
    >>> import centerkern
    >>> import centerkern.cuda
    >>> if centerkern.cuda.is_available():
    ...     backend = "cuda"
    ... else:
    ...     backend = "numba"
    >>> backend in centerkern.backends()
    True
    """
    try:
        return bool(cuda.is_available())
    except Exception:  # a broken driver installation reads as "not available", said by require_available
        return False


def require_available() -> None:
    """Raise ``BackendUnavailableError`` unless the ``cuda`` backend can run here.

    What the public functions call before they run ``backend="cuda"`` (or ``"auto"`` on device
    arrays). The message says that Numba found no CUDA GPU and driver, and, unless the simulator
    is already on, that ``NUMBA_ENABLE_CUDASIM=1`` runs Numba's CUDA simulator without one.

    Raises
    ------
    BackendUnavailableError
        If Numba finds no CUDA GPU and its driver (``is_available()`` is False).

    See Also
    --------
    is_available : The same test, as a bool.

    Examples
    --------
    >>> import centerkern
    >>> import centerkern.cuda
    >>> try:
    ...     centerkern.cuda.require_available()
    ...     backend = "cuda"
    ... except centerkern.BackendUnavailableError:
    ...     backend = "numba"
    >>> backend in centerkern.backends()
    True
    """
    if not is_available():
        simulator = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
        raise BackendUnavailableError(
            "backend 'cuda' needs a CUDA GPU and its driver, and Numba found none"
            + ("" if simulator else " (without a GPU, NUMBA_ENABLE_CUDASIM=1 runs Numba's CUDA simulator)")
        )
