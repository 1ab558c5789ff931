"""One call's device arrays: ``DeviceArrays``, and the launch shapes of the simple kernels.

``DeviceArrays`` is the twin of ``validation.HostArrays``: the same methods, for one call's
device arrays, plus the call's stream, device and ``sync`` choice, and the memory of the
caller's framework (``memory``) that its results and its one temporary come from.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import numpy as np
from numba import cuda

from .._core.interop import is_device_array
from .._core.validation import HostArrays
from . import kernels
from .launcher import Launch, clear, current_context, current_context_id, is_direct, launch_once, setup_under_capture
from .memory import is_capturing, memory_for, plain_framework
from .views import DeviceView, data_pointer, simulated

_BYTES, _FLOAT64 = np.dtype(np.uint8), np.dtype(np.float64)
_HERE = nullcontext()  # the device context of arrays on the current device: nothing to enter
GRID_STRIDE_BLOCKS = 1024  # blocks for the 1-D grid-stride kernels
THREADS_1D = 256
ROW_BLOCKS = 8192  # most blocks along the rows (or tiles) of the 2-D grid-stride kernels


def grid_1d(size: int) -> int:
    return max(1, min(GRID_STRIDE_BLOCKS, math.ceil(size / THREADS_1D)))


def launch_1d(size: int) -> tuple[int, int]:
    """(grid, block) of a 1-D grid-stride kernel over ``size`` items."""
    return grid_1d(size), THREADS_1D


def row_threads(width: int) -> int:
    return max(1, min(kernels.COLUMNS_PER_BLOCK, width))


def row_blocks(rows: int) -> int:
    return max(1, min(ROW_BLOCKS, rows))


# --------------------------------------------------------------------------- one call's arrays


class DeviceArrays:
    """Conversion and inspection of one call's device arrays (what the host inputs' checks do,
    for device arrays); also where the call's stream, device, allocator and ``sync`` choice live.

    ``centerkern.center_loss`` and its siblings make one for each call on device arrays, from
    the first device array among the inputs, and check and convert every input with it
    (``asarray``): the arrays the backend functions of ``centerkern.cuda`` then receive are its
    ``DeviceView`` objects, which keep a call's results on the device and, with ``sync=False``,
    let the call return without waiting for the GPU.

    Parameters
    ----------
    like : array or None
        A device array of the call. Its framework decides the stream and the allocator: for a
        torch tensor, torch's current stream and caching allocator; for a CuPy array, CuPy's
        current stream and memory pool; for other arrays (Numba's) and for None, ``stream``,
        Numba's allocations for results and the device's stream-ordered pool for temporaries.
    stream : None, Numba stream or int, optional
        For arrays that are not torch's or CuPy's: the stream to queue the call's kernels on, a
        Numba stream or an integer ``CUstream`` handle; None (the default) is Numba's default
        stream. For torch tensors and CuPy arrays it may only name their framework's current
        stream.
    sync : bool, optional
        Whether the call waits for the GPU and raises a bad label's ``IndexError`` itself (True,
        the default), or returns at once (see ``centerkern.center_loss``).

    Attributes
    ----------
    name : str
        ``"device"``: where the arrays live, as the validation's messages name it.
    stream_handle : int
        The ``CUstream`` handle of the call's stream (``stream`` is the same as a Numba stream
        object, made when first asked for).
    device_ordinal : int
        The device of the arrays.
    sync : bool
        The ``sync`` choice.
    capturing : bool
        Whether the stream is under CUDA graph capture.
    context_id : int
        The unique id of the device context the call runs in (0 in the simulator).
    elsewhere : bool
        Whether that context must be made current for the call (``device_context``): the
        thread's current context is another device's, or none.

    Raises
    ------
    ValueError
        If ``stream`` names another stream than the current one of the torch tensors or CuPy
        arrays, or the stream is under CUDA graph capture and ``sync`` is True, or the arrays are
        Numba's (whose results are freed when dropped, not with a graph), or CuPy's with CuPy's
        default memory pool (which is not stream-ordered, see the module docstring).
    TypeError
        If ``stream`` is neither a stream nor an integer handle.
    RuntimeError
        If the stream cannot take work (the driver cannot tell whether it is capturing: the
        legacy default stream while another stream captures, say).

    See Also
    --------
    centerkern.center_loss : Where its ``stream`` and ``sync`` choices come from.

    Examples
    --------
    This needs a CUDA GPU, or Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``).

    >>> import numpy as np
    >>> from numba import cuda
    >>> import centerkern.cuda
    >>> centers = cuda.to_device(np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]))
    >>> arrays = centerkern.cuda.DeviceArrays(centers)
    >>> arrays.name, arrays.sync
    ('device', True)
    >>> arrays.holds(centers), arrays.holds(np.zeros(3))
    (True, False)

    ``asarray`` takes a device array as it is (the caller's memory, no copy) and copies a host
    array to the device; the backend functions keep results of such views on the device:

    >>> centers_view = arrays.asarray(centers, "centers")
    >>> centers_view.shape, centers_view.dtype
    ((3, 2), dtype('float64'))
    >>> labels_view = arrays.asarray(np.array([2, 0]), "labels")
    >>> rows = centerkern.cuda.gather_centers(centers_view, labels_view)
    >>> rows.numba().copy_to_host().tolist()
    [[4.0, 5.0], [0.0, 1.0]]
    """

    name = "device"

    def __init__(self, like: Any, *, stream: Any = None, sync: bool = True):
        self.memory = memory_for(like, stream)
        self.keep_run = False  # the driver keeps what the call ran, for centerkern.cuda.repeat
        self.stream_handle = self.memory.stream_handle
        self.sync = bool(sync)
        # whether the stream captures is asked first, of the framework's stream: under capture
        # (a fresh process whose first call is captured) every setup below runs relaxed
        self.capturing = is_capturing(self.stream_handle)
        if self.capturing:
            self._check_capture()
        if self.capturing:
            with setup_under_capture(True):
                self._find_context()
        else:
            self._find_context()

    def _find_context(self) -> None:
        self.context_id, device = current_context()
        self.memory.set_device(device)
        self.device_ordinal = self.memory.device_ordinal
        # no context may be current on this thread yet, or another device's (torch's current
        # device is its own): the call then runs in Numba's context of the arrays' device
        self.elsewhere = device != self.device_ordinal
        if self.elsewhere:
            with self.device_context():
                cuda.current_context()  # made current, and made if need be
                self.context_id = current_context_id()
        self.memory.bind_context(self.context_id)

    @property
    def stream(self) -> Any:
        """The call's stream as a Numba stream object (for Numba's own launch path and copies)."""
        return self.memory.stream

    @classmethod
    def plain(cls, candidates: tuple, *, stream: Any = None, sync: bool = True):
        """The call's ``DeviceArrays`` and views of ``candidates`` (None stays None; one array
        passed twice gives one view), where they are plain device arrays of one framework on one
        device: torch CUDA tensors (or parameters), CuPy arrays, or Numba device arrays. None
        for anything else, which takes the full validation. What the views hold is checked by
        ``validation.plain_device_*``."""
        first = candidates[0]
        framework = plain_framework(first)
        if framework is None:
            return None
        device = first.get_device() if framework == "torch" else None
        for x in candidates:
            if x is None or x is first:
                continue
            if type(x) is not type(first) and plain_framework(x) != framework:
                return None
            if framework == "torch" and x.get_device() != device:
                return None
        arrays = cls(first, stream=stream, sync=sync)
        views, seen = [], {}
        for x in candidates:
            if x is None:
                views.append(None)
                continue
            view = seen.get(id(x))
            if view is None:
                view = seen[id(x)] = DeviceView.of(x, arrays)
            views.append(view)
        return arrays, views

    def _check_capture(self) -> None:
        if self.sync:
            raise ValueError("sync=True waits for the GPU, which a stream under CUDA graph capture cannot; "
                             "pass sync=False to capture this call")
        if self.memory.name == "numba":
            raise ValueError(
                "a call on Numba device arrays cannot be captured in a CUDA graph: its results are Numba arrays, "
                "freed when dropped rather than with the graph; capture calls on torch tensors or CuPy arrays, "
                "whose allocators serve graphs"
            )
        if self.memory.name == "cupy" and not self.memory.graph_safe():
            raise ValueError(
                "a call on CuPy arrays can be captured in a CUDA graph only with CuPy's stream-ordered allocator: "
                "CuPy's default memory pool hands memory a graph replays into to later arrays; call "
                "cupy.cuda.set_allocator(cupy.cuda.MemoryAsyncPool().malloc) before capturing"
            )

    def device_context(self):
        """Numba's context for the device of the call's arrays: kernels are bound, and Numba and
        the stream-ordered pool allocate, in the current context."""
        return cuda.gpus[self.device_ordinal] if self.elsewhere else _HERE

    def asarray(self, x: Any, what: str) -> DeviceView:
        """``x`` as a ``DeviceView``: a device array as it is (no copy), a host array copied to
        the device on the call's stream; ``what`` names it in error messages."""
        if isinstance(x, DeviceView):
            return x
        if is_device_array(x):
            return DeviceView.of(x, self)  # the caller's own memory, no copy
        host = np.ascontiguousarray(HostArrays.asarray(x, what))
        if self.capturing:
            raise ValueError(
                f"{what} is a host array, and a copy to the device cannot be captured in a CUDA graph (it waits "
                f"for the host's memory): move {what} to the device before capturing"
            )
        with self.device_context():
            return DeviceView.of(self.memory.from_host(host), self)

    @staticmethod
    def holds(x: Any) -> bool:
        """Whether ``x`` lives in device memory, where this backend computes."""
        return is_device_array(x)

    def flat_labels(self, labels: DeviceView) -> DeviceView:
        """The labels as a vector (a contiguous array reshaped; rare strided N-D labels copied)."""
        if labels.ndim == 1:
            return labels
        if labels.is_c_contiguous():
            return labels.reshape((labels.size,))
        if self.capturing and self.memory.name == "numba":
            raise ValueError("strided labels of two or more dimensions are flattened through the host, which a "
                             "stream under CUDA graph capture cannot do: pass contiguous labels")
        with self.device_context():
            return DeviceView.of(self.memory.flat(labels), self)  # rare: strided N-D labels

    @staticmethod
    def first_out_of_range(labels: DeviceView, num_classes: int) -> None:
        """Deferred: the range check runs on the device, in the call's first kernel (see
        ``centerkern.cuda.kernels``), so that the host never waits for the labels."""
        return None

    @staticmethod
    def as_label_vector(labels: DeviceView) -> DeviceView:
        """The labels as they are: no cast, no copy."""
        return labels  # the kernels read any integer dtype, at any stride

    @staticmethod
    def contiguous(x: DeviceView) -> DeviceView:
        """``x`` as it is, whatever its strides."""
        return x  # the kernels index with strides; copying would cost more than it saves

    @staticmethod
    def is_writable(x: DeviceView) -> bool:
        """Whether ``x`` may be written (its array interface does not say read-only)."""
        return not x.readonly

    @staticmethod
    def strides(x: DeviceView) -> tuple[int, ...]:
        """The strides of ``x``, in bytes."""
        return x.strides

    @staticmethod
    def same_memory(a: DeviceView, b: DeviceView) -> bool:
        """Whether ``a`` and ``b`` are the same array: same pointer, shape and strides."""
        return a.pointer == b.pointer and a.shape == b.shape and a.strides == b.strides

    @staticmethod
    def may_share_memory(a: DeviceView, b: DeviceView) -> bool:
        """Whether the byte ranges ``a`` and ``b`` may touch overlap."""
        start_a, end_a = a.extent()
        start_b, end_b = b.extent()
        return start_a < end_b and start_b < end_a

    # ----------------------------------------------------------------------- memory of the call

    def empty(self, shape: tuple[int, ...], dtype) -> DeviceView:
        """A result: the caller's framework's array, which the caller gets back."""
        shape, dtype = tuple(shape), np.dtype(dtype)
        owner = self.memory.empty(shape, dtype)  # (torch and CuPy allocate on the arrays' device themselves)
        return DeviceView.contiguous(owner, data_pointer(owner), shape, dtype, self, fresh=True)

    def zeros(self, shape: tuple[int, ...], dtype) -> DeviceView:
        """A zeroed result, like ``empty``: cleared by a memset on the call's stream (a fill kernel
        on Numba's own launch path)."""
        view = self.empty(shape, dtype)
        view.cleared = True
        if is_direct():
            with self.device_context():
                clear(view.pointer, view.size * view.dtype.itemsize, self.stream_handle)
        else:
            self.fill(view, 0)
        return view

    def temporary(self, size: int) -> DeviceView:
        """``size`` bytes for this call alone (see the module docstring), the call's one temporary,
        which it carves into its parts (``DeviceView.part``); call ``release`` once the call's
        kernels are queued. The caller's device context must be current."""
        owner = self.memory.temporary(size)
        return DeviceView.contiguous(owner, data_pointer(owner), (max(1, size),), _BYTES, self)

    def release(self) -> None:
        """Give the call's temporaries back, in stream order (torch's and CuPy's go when dropped)."""
        self.memory.release()

    def copy(self, x: DeviceView) -> DeviceView:
        """A fresh copy of ``x``, made before the call's label check (validation's copies of an
        input that overlaps the output)."""
        out = self.empty(x.shape, x.dtype)
        if x.ndim == 1:
            self._launch(Launch(kernels.copy_vector, *launch_1d(x.size), (x, out)))
        else:
            self._launch(Launch(kernels.copy_matrix, row_blocks(x.shape[0]), row_threads(x.shape[1]), (x, out)))
        return out

    def fill(self, view: DeviceView, value) -> None:
        """Fill an array of the backend's own, on the call's stream."""
        if view.ndim == 1:
            self._launch(Launch(kernels.fill_vector, *launch_1d(view.size), (view, value)))
        else:
            self._launch(Launch(kernels.fill_rows, row_blocks(view.shape[0]), row_threads(view.shape[1]),
                                (view, value)))

    def _launch(self, launch: Launch) -> None:
        with self.device_context():
            launch_once([launch], self)

    def new_loss(self) -> DeviceView:
        """A float64 0-d array of the caller's framework (the view's owner, given back to the
        caller), seen by the kernels as a vector of one."""
        owner = self.memory.empty((), _FLOAT64)
        return DeviceView.contiguous(owner, data_pointer(owner), (1,), _FLOAT64, self, fresh=True)
