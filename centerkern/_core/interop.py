"""Results in the caller's framework: torch in, torch out; JAX in, JAX out; and so on.

The kernels compute on NumPy arrays (host) or device memory (GPU). Inputs reach them without a
copy through DLPack or ``__cuda_array_interface__`` (see ``validation.HostArrays`` and
``centerkern.cuda.arrays.DeviceArrays``); device results are allocated by the caller's own
framework and come back as they are (``Owned``); this module takes the rest back the same way:

========== ============================= =====================================================
framework  host results                  device results
========== ============================= =====================================================
torch      ``torch.from_numpy`` (shared) ``torch.as_tensor`` on the input's device (shared)
JAX        ``jax.numpy.from_dlpack``     through host memory (JAX GPU arrays are not
           (shared where aligned)        writable through the CUDA Array Interface)
TensorFlow DLPack (shared when aligned)  through host memory
CuPy       (CuPy arrays live on device)  ``cupy.asarray`` (shared)
other      NumPy as is                   Numba device arrays as is
========== ============================= =====================================================

No framework is imported unless the caller passed one of its arrays: a framework is known by
the module its array type comes from.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

_FRAMEWORK_OF_MODULE = {
    "torch": "torch",
    "jax": "jax",
    "jaxlib": "jax",
    "tensorflow": "tensorflow",
    "cupy": "cupy",
}

# Frameworks whose arrays cannot be written in place, and what to do instead.
_IMMUTABLE = {
    "jax": "JAX arrays are immutable; pass out=None and use the returned centers "
    "(or centerkern.jax.center_loss inside jax.jit)",
    "tensorflow": "TensorFlow tensors and variables cannot be written in place through array "
    "interop; pass out=None and use the returned centers (or centerkern.tensorflow, which "
    "updates a tf.Variable)",
}

# The dtypes centerkern computes in (its inputs are checked to be one of these, no cast made).
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


_FRAMEWORK_OF_TYPE: dict = {}


def framework_of(x: Any) -> str:
    """``torch``, ``jax``, ``tensorflow``, ``cupy``, or ``other`` (NumPy, lists, Numba arrays)."""
    kind = type(x)
    framework = _FRAMEWORK_OF_TYPE.get(kind)
    if framework is None:
        framework = _FRAMEWORK_OF_MODULE.get(kind.__module__.partition(".")[0], "other")
        if len(_FRAMEWORK_OF_TYPE) < 1024:  # array types are few; a program making types without end is not
            _FRAMEWORK_OF_TYPE[kind] = framework
    return framework


def exportable(x: Any) -> Any:
    """``x`` in a form the exchange protocols accept, sharing its memory.

    torch refuses to export a tensor that requires grad (DLPack and the CUDA Array Interface
    both raise); the kernels only read it, or write it as an optimizer would, so its detached
    view is what they get."""
    if framework_of(x) == "torch" and getattr(x, "requires_grad", False):
        return x.detach()
    return x


def torch_host_view(tensor: Any) -> np.ndarray | None:
    """A torch CPU tensor's own NumPy view (zero-copy, writable with every torch release; through
    DLPack, a torch that exports no versioned DLPack, such as 2.5, gives NumPy a read-only view),
    or None where torch refuses one: CUDA, meta and sparse tensors, conjugate or negative views,
    bfloat16, a tensor that requires grad."""
    try:
        return tensor.numpy()
    except (TypeError, RuntimeError, ValueError):
        return None


def check_writable(out: Any) -> None:
    """Raise if ``out`` belongs to a framework whose arrays cannot be written in place."""
    reason = _IMMUTABLE.get(framework_of(out))
    if reason is not None:
        raise TypeError(f"out of type {type(out).__name__} cannot be updated in place: {reason}")


def mark_written(out: Any) -> None:
    """Tell torch's autograd that ``out`` was written in place: the kernels write through raw
    memory, which torch's version counter cannot see, and a graph that saved ``out`` earlier
    would then differentiate with the moved values instead of raising."""
    if framework_of(out) == "torch":
        import torch

        torch.autograd.graph.increment_version(out)


def _on_device(x: Any) -> bool:
    return not isinstance(x, np.ndarray)


def _to_torch(like: Any) -> Callable[[Any], Any]:
    import torch

    def convert(x):
        if _on_device(x):
            return torch.as_tensor(x, device=like.device)  # through __cuda_array_interface__
        return torch.from_numpy(x)

    return convert


def _to_jax(like: Any) -> Callable[[Any], Any]:
    import jax.numpy as jnp

    def convert(x):
        if _on_device(x):
            return jnp.asarray(x.copy_to_host())
        return jnp.from_dlpack(x)

    return convert


def _to_tensorflow(like: Any) -> Callable[[Any], Any]:
    import tensorflow as tf

    def convert(x):
        host = x.copy_to_host() if _on_device(x) else x
        if host.ctypes.data % _TENSORFLOW_ALIGNMENT:
            # TensorFlow aborts the process (not an exception) on the first op over a shared
            # buffer that is not aligned as its own allocator aligns
            return tf.convert_to_tensor(host)
        return tf.experimental.dlpack.from_dlpack(host.__dlpack__())

    return convert


def _to_cupy(like: Any) -> Callable[[Any], Any]:
    import cupy

    def convert(x):
        return cupy.asarray(x)  # a device result through __cuda_array_interface__; a host one copied up

    return convert


_TENSORFLOW_ALIGNMENT = 64


class Owned:
    """A backend's view of memory that belongs to ``owner``, an array of the caller's framework
    (the CUDA backend's ``DeviceView``): a result goes back to the caller as the owner itself."""

    __slots__ = ("owner",)


_CONVERTERS = {"torch": _to_torch, "jax": _to_jax, "tensorflow": _to_tensorflow, "cupy": _to_cupy}


def converter_like(like: Any, host: bool = False) -> Callable[[Any], Any]:
    """A function taking a result array to the framework of ``like`` (the identity for NumPy,
    lists and Numba arrays). ``host``: the results are NumPy arrays (none is a device result
    to unwrap), so NumPy's identity needs no wrapper."""
    if host and type(like) is np.ndarray:
        return _identity
    make = _CONVERTERS.get(framework_of(like))
    convert = _identity if make is None else make(like)
    return lambda x: convert(x.owner if isinstance(x, Owned) else x)


def _identity(x: Any) -> Any:
    return x


def plain_host_arrays(*arrays: Any) -> list | None:
    """NumPy views, sharing memory, of NumPy arrays and torch CPU tensors (None stays None): what
    the plain-input path of ``_api`` can take without its full validation. None when any array
    is something else (a list, a device array, another framework's array, a bfloat16 tensor).
    One tensor passed twice (``out=centers``) gives one view, so that identity is kept."""
    views: list = []
    seen: dict[int, np.ndarray] = {}
    for array in arrays:
        if array is None or type(array) is np.ndarray:
            views.append(array)
            continue
        if framework_of(array) != "torch" or array.is_cuda:  # (a CUDA tensor's numpy() raises: slower)
            return None
        view = seen.get(id(array))
        if view is None:
            view = torch_host_view(array.detach())
            if view is None:
                return None
            seen[id(array)] = view
        views.append(view)
    return views


def is_device_array(x: Any) -> bool:
    """Whether ``x`` lives in GPU memory: the CUDA Array Interface (numba, CuPy, torch), or a
    Numba device array (which is how the CUDA simulator's arrays show themselves)."""
    if type(x) is np.ndarray:
        return False
    if framework_of(x) == "torch" and hasattr(x, "is_cuda"):
        return bool(x.is_cuda)  # torch's __cuda_array_interface__ is Python code that builds a dictionary
    if getattr(type(x), "__cuda_ndarray__", False):
        return True  # a Numba device array, whose interface is a property too
    return hasattr(x, "__cuda_array_interface__")
