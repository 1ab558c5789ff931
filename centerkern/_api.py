"""The public functions: select a backend, validate once, allocate, call the backend's kernel.

The backends (``centerkern._backends``: ``numpy_reference``, ``numba_cpu``, and the ``cuda``
package) share one set of signatures and only do arithmetic, in place, on arrays that
``_core.validation`` has checked. This module decides what is copied: nothing when ``out=centers`` (the fast path), the centers once
when ``out=None`` (the caller's arrays are never modified). The copy is the backend's first
write (``copy_from``), so that the CUDA backend, whose label check runs on the device, makes it
only once the labels are known to be good.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

from . import _backends
from ._core import interop, validation
from ._core.interop import is_device_array
from ._core.rules import rule_coefficients
from ._core.validation import HostArrays, check_choice
from ._results import CenterLossResult, with_shared_docs


# Plain host inputs with one of these backend choices run the numba kernels after a few
# attribute checks (``validation.plain_center_loss``); everything else is validated in full.
_PLAIN_BACKENDS = ("auto", "numba")


@functools.cache
def _host_arrays(backend: str) -> HostArrays:
    """Host arrays as ``backend`` computes on them, allocated by that backend."""
    return HostArrays(zeros=_backends.load(backend).zeros)


def _plain(backend: Any, check, arrays: tuple, *settings: Any):
    """``check(*views, *settings)`` on NumPy views of ``arrays`` (``interop.plain_host_arrays``)
    when the backend choice allows the plain path: the checked inputs, or None where the full
    validation must run."""
    if backend not in _PLAIN_BACKENDS:
        return None
    views = interop.plain_host_arrays(*arrays)
    return None if views is None else check(*views, *settings)


_PLAIN_DEVICE_BACKENDS = ("auto", "cuda")


def _maybe_plain_on_device(backend: Any, first: Any) -> bool:
    """Whether the backend choice allows a plain device path, and the call's first array lives on
    the device (the plain and repeat paths check the rest)."""
    return backend in _PLAIN_DEVICE_BACKENDS and is_device_array(first)


def _plain_on_device(backend: Any, check, arrays: tuple, *settings: Any, stream: Any, sync: bool,
                     remembered: Any = None):
    """The same for device arrays: ``check(*views, *settings, device_arrays)`` on views of plain
    device arrays (``centerkern.cuda.DeviceArrays.plain``) when the backend choice allows it.
    (the call's ``DeviceArrays``, the checked inputs), or None where the full validation must
    run. ``remembered``: the call's signature, whose plain run ``centerkern.cuda.repeat`` keeps."""
    if not _maybe_plain_on_device(backend, arrays[0]):
        return None
    plain = _backends.cuda().DeviceArrays.plain(arrays, stream=stream, sync=sync)
    if plain is None:
        return None
    device_arrays, views = plain
    checked = check(*views, *settings, device_arrays)
    device_arrays.keep_run = remembered is not None
    return None if checked is None else (device_arrays, checked)


def _repeated(backend: Any, function: str, arrays: tuple, choices: tuple, stream: Any, sync: bool):
    """(outputs, None) of a call on plain device arrays whose signature this thread has run
    before (``centerkern.cuda.repeat``); else (None, the signature to remember once the plain
    path has run the call, or None)."""
    if not _maybe_plain_on_device(backend, arrays[0]):
        return None, None
    return _backends.cuda().repeat.run(function, arrays, choices, stream, sync)


def _owner(result: Any) -> Any:
    """A device result of the plain path as the caller gets it: the framework's own array."""
    return result.owner


def backends() -> tuple[str, ...]:
    """The backend names usable on this machine, fastest last: ``numpy``, ``numba``, and ``cuda``
    where Numba finds a GPU (or runs its CUDA simulator, ``NUMBA_ENABLE_CUDASIM=1``).

    Any of them can be passed as ``backend=`` to ``center_loss``, ``gather_centers`` and
    ``scatter_sub_update``; the default, ``"auto"``, takes ``cuda`` for device arrays and
    ``numba`` for everything else. ``cuda`` is left out, without an error, where the optional
    ``numba-cuda`` extra is not installed or no GPU is found.

    Returns
    -------
    tuple of str
        ``("numpy", "numba")`` or ``("numpy", "numba", "cuda")``.

    See Also
    --------
    BackendUnavailableError : What asking for a backend that cannot run raises.

    Examples
    --------
    >>> import centerkern
    >>> centerkern.backends()[:2]
    ('numpy', 'numba')
    >>> backend = "cuda" if "cuda" in centerkern.backends() else "numba"
    """
    return _backends.available()


def _select(backend: Any, *arrays: Any, stream: Any = None, sync: bool = True) -> tuple[ModuleType, Any]:
    """The kernel module for ``backend`` and the object that checks and converts its arrays (for
    device arrays, also the call's stream, allocator and ``sync`` choice)."""
    check_choice(backend, "backend", _backends.CHOICES)
    device_arrays = [a for a in arrays if a is not None and is_device_array(a)]
    on_device = bool(device_arrays)
    if backend == "auto":
        backend = "cuda" if on_device else "numba"
    if backend == "cuda":
        module = _backends.cuda()
        return module, (module.DeviceArrays(device_arrays[0], stream=stream, sync=sync) if on_device
                        else _host_arrays("numpy"))
    if on_device:
        raise ValueError(
            f"backend {backend!r} computes in host memory but got a device array; "
            "use backend='cuda' or backend='auto'"
        )
    return _backends.load(backend), _host_arrays(backend)


def _exportable(*arrays: Any) -> tuple[Any, ...]:
    return tuple(interop.exportable(a) for a in arrays)


def _target(arrays, centers, out, out_is_centers):
    """The array the update is written into (out itself, or a fresh array), and the centers to
    copy into it first (None on the in-place path)."""
    if out is None:
        return arrays.empty(centers.shape, centers.dtype), centers
    return out, (None if out_is_centers else centers)


def checked_center_loss_inputs(
    features, labels, centers, alpha, rule, out, backend, grad_out=None
) -> validation.CenterLossInputs:
    """Every check ``center_loss`` makes, and nothing written: for callers that must know the
    input is good before they start (``centerkern.distributed``, before a collective; it runs
    on host arrays, whose labels are checked here)."""
    features, labels, centers, out, grad_out = _exportable(features, labels, centers, out, grad_out)
    _, arrays = _select(backend, features, centers, out, grad_out)
    return validation.validate_center_loss(features, labels, centers, alpha, rule, out, arrays, grad_out)


@with_shared_docs
def gather_centers(centers: Any, labels: Any, *, backend: str = "auto", sync: bool = True, stream: Any = None) -> Any:
    """Return ``centers[labels]``: the (B, D) rows of the centers of the batch's classes.

    The gather of every center-loss step, on its own. The labels are checked before anything
    is read: a negative label is an error, not a row counted from the end.

    Parameters
    ----------
    centers : array_like, shape (K, D)
        A float32 or float64 array: a NumPy array, a list, or any array of another framework
        (see ``center_loss``).
    labels : array_like of int
        An integer array of any shape holding B values in [0, K); flattened. Any integer dtype,
        not bool.
    {backend}
    {sync and stream}

    Returns
    -------
    array, shape (B, D), the dtype of ``centers``
        A new array, in the framework of ``centers`` (a NumPy array for NumPy arrays and
        lists, on the device for device arrays).

    Raises
    ------
    {IndexError}
    TypeError
        If ``centers`` is not float32 or float64, or the labels do not have an integer dtype
        (bool included).
    ValueError
        If ``centers`` is not 2-D, ``backend`` is not one of the names above, or a device array
        is given to a host backend (``numpy``, ``numba``).
    {BackendUnavailableError}

    See Also
    --------
    scatter_sub_update : The scatter that moves these rows.
    center_loss : A whole step, which gathers the centers itself.

    Examples
    --------
    >>> import numpy as np
    >>> import centerkern
    >>> centers = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    >>> centerkern.gather_centers(centers, [2, 0, 2]).tolist()
    [[4.0, 5.0], [0.0, 1.0], [4.0, 5.0]]

    Labels of any shape are flattened:

    >>> centerkern.gather_centers(centers, np.array([[1, 1], [0, 2]])).shape
    (4, 2)

    A label outside [0, K) is an error, not a wrap-around as ``centers[-1]`` would be:

    >>> centerkern.gather_centers(centers, [0, -1])
    Traceback (most recent call last):
        ...
    IndexError: label -1 at position 1 is out of range: labels must lie in [0, 3) for 3 classes
    """
    outputs, remembered = _repeated(backend, "gather", (centers, labels), (), stream, sync)
    if outputs is not None:  # a call this thread has run before, see centerkern.cuda.repeat
        return outputs[0]
    plain = _plain_on_device(backend, validation.plain_device_gather, (centers, labels), stream=stream, sync=sync,
                             remembered=remembered)
    if plain is not None:  # the common case on a GPU, see validation.plain_device_gather
        cuda = _backends.load("cuda")
        rows = cuda.gather_centers(plain[1].centers, plain[1].labels)
        cuda.repeat.remember(remembered, (centers, labels), (rows,), (), plain[0])
        return rows.owner
    to_caller = interop.converter_like(centers)
    centers, labels = _exportable(centers, labels)
    kernels, arrays = _select(backend, centers, labels, stream=stream, sync=sync)
    checked = validation.validate_gather(centers, labels, arrays)
    return to_caller(kernels.gather_centers(checked.centers, checked.labels))


@with_shared_docs
def scatter_sub_update(
    centers: Any, labels: Any, updates: Any, *, out: Any = None, backend: str = "auto",
    deterministic: bool = False, sync: bool = True, stream: Any = None,
) -> Any:
    """Subtract ``updates[i]`` from row ``labels[i]`` of the centers, for every i.

    Duplicate labels accumulate, as in ``tf.scatter_sub`` and ``np.subtract.at``:
    ``scatter_sub_update([[1], [2], [3]], [0, 0, 1, 1], [[9], [10], [11], [12]])`` is
    ``[[-18], [-21], [3]]``. (``centers[labels] -= updates`` keeps one duplicate only.)

    Every check runs before anything is written: on any error, ``centers`` and ``out`` are left
    as they were.

    Parameters
    ----------
    centers : array_like, shape (K, D)
        A float32 or float64 array.
    labels : array_like of int
        An integer array holding B values in [0, K), any shape (flattened).
    updates : array_like, shape (B, D)
        The dtype of ``centers``.
    out : None or array, shape (K, D), optional
        None: ``centers`` is left as it was and a new array is returned. ``out=centers`` updates
        in place without copying the K x D centers, and returns ``out``. Any other writable
        array of the shape and dtype of ``centers`` receives the result.
    {backend}
    {deterministic}
    {sync and stream}

    Returns
    -------
    array, shape (K, D)
        The updated centers: ``out`` itself when given, else a new array in the framework of
        ``centers``.

    Raises
    ------
    {IndexError}
    TypeError
        If ``centers`` or ``updates`` is not float32 or float64, their dtypes differ (no silent
        cast), the labels do not have an integer dtype (bool included), or ``out`` has another
        dtype than ``centers``, is a list, or is an array that cannot be written in place (a JAX
        or TensorFlow tensor).
    ValueError
        If ``centers`` or ``updates`` is not 2-D, their numbers of columns differ, the labels do
        not hold one value per row of ``updates``, ``out`` has another shape than ``centers``,
        is read-only, overlaps itself or lives in other memory than the backend's, ``backend``
        is not one of the names above, or a device array is given to a host backend.
    {BackendUnavailableError}

    See Also
    --------
    gather_centers : The gather, ``centers[labels]``.
    center_loss : A whole step, which moves the centers with this scatter.

    Examples
    --------
    The primitive of ``tf.scatter_sub``, with labels 0 and 1 both repeated: both updates of
    each class are subtracted.

    >>> import numpy as np
    >>> import centerkern
    >>> centers = np.array([[1.0], [2.0], [3.0]])
    >>> updates = np.array([[9.0], [10.0], [11.0], [12.0]])
    >>> centerkern.scatter_sub_update(centers, [0, 0, 1, 1], updates).tolist()
    [[-18.0], [-21.0], [3.0]]

    Fancy indexing keeps only one update per repeated label, which is the classic mistake:

    >>> wrong = centers.copy()
    >>> wrong[[0, 0, 1, 1]] -= updates
    >>> wrong.tolist()
    [[-9.0], [-10.0], [3.0]]

    ``out=centers`` updates in place, and returns that same array:

    >>> labels = np.array([0, 0, 1])
    >>> moved = centerkern.scatter_sub_update(centers, labels, np.ones((3, 1)), out=centers)
    >>> moved is centers, centers.tolist()
    (True, [[-1.0], [1.0], [3.0]])

    A bad label raises before anything is written:

    >>> centerkern.scatter_sub_update(centers, [0, 3, 1], np.ones((3, 1)), out=centers)
    Traceback (most recent call last):
        ...
    IndexError: label 3 at position 1 is out of range: labels must lie in [0, 3) for 3 classes
    >>> centers.tolist()
    [[-1.0], [1.0], [3.0]]
    """
    caller_out = out
    inputs = (centers, labels, updates, out)
    checked = _plain(backend, validation.plain_scatter, inputs)
    plain = remembered = None
    if checked is None:
        outputs, remembered = _repeated(backend, "scatter", inputs, (bool(deterministic),), stream, sync)
        if outputs is not None:  # a call this thread has run before, see centerkern.cuda.repeat
            if caller_out is None:
                return outputs[0]
            interop.mark_written(caller_out)
            return caller_out
        plain = _plain_on_device(backend, validation.plain_device_scatter, inputs, stream=stream, sync=sync,
                                 remembered=remembered)
    if checked is not None:  # the common case on the CPU, see validation.plain_scatter
        to_caller = interop.converter_like(centers, host=True)
        kernels, arrays = _backends.load("numba"), _host_arrays("numba")
    elif plain is not None:  # the common case on a GPU, see validation.plain_device_scatter
        to_caller = _owner
        kernels, (arrays, checked) = _backends.load("cuda"), plain
    else:
        to_caller = interop.converter_like(centers)
        centers, labels, updates, out = _exportable(centers, labels, updates, out)
        kernels, arrays = _select(backend, centers, updates, out, stream=stream, sync=sync)
        checked = validation.validate_scatter(centers, labels, updates, out, arrays)
    target, copy_from = _target(arrays, checked.centers, checked.out, checked.out_is_centers)
    kernels.scatter_sub_update(target, checked.labels, checked.updates, deterministic=deterministic,
                               copy_from=copy_from)
    if plain is not None:  # out (index 3), when given, is the centers and overlaps neither labels nor updates
        kernels.repeat.remember(remembered, inputs, (target,), ((3, 1), (3, 2)) if out is not None else (), arrays)
    if caller_out is None:
        return to_caller(target)
    interop.mark_written(caller_out)
    return caller_out


@with_shared_docs
def center_loss(
    features: Any, labels: Any, centers: Any, alpha: Any, *, rule: str = "facenet", out: Any = None,
    grad_out: Any = None, backend: str = "auto", deterministic: bool = False, sync: bool = True,
    stream: Any = None,
) -> CenterLossResult:
    r"""One center-loss step: the loss, its gradient, and the centers moved toward the features.

    With :math:`d_i = x_i - c_{y_i}` (``x_i = features[i]``, ``y_i = labels[i]``, ``c_j =
    centers[j]`` as it was before the call, for every sample, duplicates included), :math:`n_j`
    the number of samples of class :math:`j`, :math:`B` the batch size and :math:`D` the feature
    size:

    ======= =============================================== ======================== ===========================================================================
    rule    loss                                            grad                     centers after the call
    ======= =============================================== ======================== ===========================================================================
    facenet :math:`\frac{1}{BD} \sum_i \lVert d_i \rVert^2` :math:`\frac{2 d_i}{BD}` :math:`c_j + (1 - \alpha) \sum_{i: y_i = j} d_i`
    wen     :math:`\frac{1}{2B} \sum_i \lVert d_i \rVert^2` :math:`\frac{d_i}{B}`    :math:`c_j + \frac{\alpha}{1 + n_j} \sum_{i: y_i = j} d_i`
    pytorch :math:`\frac{1}{B} \sum_i \lVert d_i \rVert^2`  :math:`\frac{2 d_i}{B}`  unchanged; ``grad_centers[j]`` :math:`= -\frac{2}{B} \sum_{i: y_i = j} d_i`
    ======= =============================================== ======================== ===========================================================================

    ``facenet`` is davidsandberg/facenet's TensorFlow code (alpha is the retention; it trains
    with 0.95), ``wen`` is Eq. 2-4 of Wen et al., ECCV 2016 (https://doi.org/10.1007/978-3-319-46478-7_31)
    as in caffe-face and PaddlePaddle, ``pytorch`` is KaiyangZhou/pytorch-center-loss. Classes
    absent from the batch are untouched.

    Every check runs before anything is written: on any error, no caller array is modified.

    Parameters
    ----------
    features : array_like, shape (B, D)
        A float32 or float64 array: a NumPy array, a list, or any object with ``__array__``,
        ``__dlpack__`` or ``__cuda_array_interface__`` (torch, JAX, TensorFlow, CuPy, Numba).
        Any memory layout gives the same numbers.
    labels : array_like of int
        An integer array holding B values in [0, K), any shape (flattened). Any integer dtype,
        not bool.
    centers : array_like, shape (K, D)
        The dtype of ``features``.
    alpha : float
        A finite real number, with its source's meaning: the retention for ``facenet`` (the
        centers move by 1 - alpha), the step for ``wen``; ``pytorch`` does not use it (it is
        checked all the same).
    rule : {"facenet", "wen", "pytorch"}, optional
        The published formula (table above); ``"facenet"`` by default.
    out : None or array, shape (K, D), optional
        None: ``centers`` is left as it was and a new array is returned. ``out=centers`` updates
        in place without copying the K x D centers, and is returned as ``result.centers``.
    grad_out : None or array, shape (B, D), optional
        The dtype of ``features``.
        Where to write the grad (returned as ``result.grad``), so that a training loop need not
        allocate B x D every step. It may overlap no input. None: a new array.
    {backend}
    {deterministic}
    sync : bool, optional
        Device arrays only. The labels are checked on the device; a bad one makes the call write
        nothing and its loss NaN. ``True`` (the default): the call waits for that check and
        raises its ``IndexError``. ``False``: the call returns at once (the GPU step as a
        training loop wants it, and what CUDA graph capture needs); the error is raised by the
        next call on the device once this one has finished, or by
        ``centerkern.cuda.check_errors()``.
    stream : None, Numba stream or int, optional
        A Numba stream or an integer ``CUstream`` handle.
        Device arrays only: the stream the call's kernels are queued on. torch tensors and CuPy
        arrays use their framework's current stream (``stream=`` may only name that one);
        other device arrays use this stream, by default Numba's default stream.

    Returns
    -------
    CenterLossResult
        ``(loss, grad, centers, grad_centers)``. ``loss`` is a Python float for host inputs and
        a 0-d float64 device array for device inputs; the arrays are in the framework of
        ``features`` (NumPy arrays for NumPy arrays and lists).

    Raises
    ------
    IndexError
        If a label lies outside [0, K): the message names the first bad value, its position and
        K. For device arrays with ``sync=False``, raised by the next call on the device or by
        ``centerkern.cuda.check_errors()`` instead.
    TypeError
        If ``features`` or ``centers`` is not float32 or float64, their dtypes differ (no silent
        cast), the labels do not have an integer dtype (bool included), ``alpha`` is not a real
        number (bool included), or ``out`` or ``grad_out`` has the wrong dtype, is a list, or
        cannot be written in place (a JAX or TensorFlow tensor).
    ValueError
        If ``rule`` or ``backend`` is not one of the names above, ``alpha`` is not finite,
        ``features`` or ``centers`` is not 2-D, their numbers of columns differ, the labels do
        not hold one value per row of ``features``, ``out`` or ``grad_out`` has the wrong shape,
        is read-only, overlaps itself or lives in other memory than the backend's, ``grad_out``
        overlaps an input or ``out``, or a device array is given to a host backend.
    {BackendUnavailableError}

    See Also
    --------
    CenterLossResult : What it returns.
    gather_centers : The step's gather on its own.
    scatter_sub_update : The step's scatter on its own.

    Examples
    --------
    The worked example: nine features of three classes, centers at zero, ``alpha = 0.5``. The
    four samples of class 0 all move its center (duplicate labels add up):

    >>> import numpy as np
    >>> import centerkern
    >>> features = np.array([[1, 1, 1, 1, 1], [1, 1, 2, 1, 1], [1, 1, 3, 1, 1],
    ...                      [1, 1, 4, 1, 1], [2, 2, 2, 1, 2], [2, 2, 2, 2, 2],
    ...                      [2, 2, 2, 3, 2], [3, 3, 3, 3, 1], [3, 3, 3, 3, 2]], dtype=np.float32)
    >>> labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2])
    >>> centers = np.zeros((3, 5), dtype=np.float32)
    >>> result = centerkern.center_loss(features, labels, centers, 0.5)
    >>> round(result.loss, 6)
    4.111111
    >>> print(result.centers)
    [[2.  2.  5.  2.  2. ]
     [3.  3.  3.  3.  3. ]
     [3.  3.  3.  3.  1.5]]
    >>> result.grad.shape, result.grad.dtype
    ((9, 5), dtype('float32'))
    >>> bool(centers.any())  # out=None: the caller's centers are left as they were
    False

    A training loop updates the centers in place, with ``out=centers``:

    >>> for step in range(3):
    ...     result = centerkern.center_loss(features, labels, centers, 0.5, out=centers)
    ...     print(round(result.loss, 6))
    4.111111
    1.411111
    1.161111
    >>> result.centers is centers
    True

    The other rules, from the same data:

    >>> start = np.zeros((3, 5), dtype=np.float32)
    >>> wen = centerkern.center_loss(features, labels, start, 0.5, rule="wen")
    >>> round(wen.loss, 6)
    10.277778
    >>> print(np.round(wen.centers, 3))
    [[0.4  0.4  1.   0.4  0.4 ]
     [0.75 0.75 0.75 0.75 0.75]
     [1.   1.   1.   1.   0.5 ]]
    >>> pytorch = centerkern.center_loss(features, labels, start, 0.5, rule="pytorch")
    >>> round(pytorch.loss, 6), pytorch.grad_centers.shape
    (20.555556, (3, 5))

    Bad input raises before anything is written:

    >>> before = centers.copy()
    >>> centerkern.center_loss(features, [0, 0, 0, 0, 1, 1, 1, 2, 3], centers, 0.5, out=centers)
    Traceback (most recent call last):
        ...
    IndexError: label 3 at position 8 is out of range: labels must lie in [0, 3) for 3 classes
    >>> np.array_equal(centers, before)
    True
    >>> centerkern.center_loss(features, labels, np.zeros((3, 5)), 0.5)
    Traceback (most recent call last):
        ...
    TypeError: dtypes must match (no silent cast): features float32, centers float64
    >>> centerkern.center_loss(features, labels, centers, 0.5, rule="tensorflow")
    Traceback (most recent call last):
        ...
    ValueError: unknown rule 'tensorflow'; valid choices are ...
    """
    caller_out, caller_grad_out = out, grad_out
    inputs = (features, labels, centers, out, grad_out)
    checked = _plain(backend, validation.plain_center_loss, inputs, alpha, rule)
    plain = remembered = None
    if checked is None:
        # alpha's type too: 1.0 and True are equal, but only a float is a plain alpha
        outputs, remembered = _repeated(backend, "center_loss", inputs, (rule, alpha, type(alpha), bool(deterministic)),
                                        stream, sync)
        if outputs is not None:  # a call this thread has run before, see centerkern.cuda.repeat
            return _center_loss_result(*outputs, caller_out, caller_grad_out, _identity)
        plain = _plain_on_device(backend, validation.plain_device_center_loss, inputs, alpha, rule, stream=stream,
                                 sync=sync, remembered=remembered)
    if checked is not None:  # the common case on the CPU, see validation.plain_center_loss
        to_caller = interop.converter_like(features, host=True)
        kernels, arrays = _backends.load("numba"), _host_arrays("numba")
    elif plain is not None:  # the common case on a GPU, see validation.plain_device_center_loss
        to_caller = _owner
        kernels, (arrays, checked) = _backends.load("cuda"), plain
    else:
        to_caller = interop.converter_like(features)
        features, labels, centers, out, grad_out = _exportable(features, labels, centers, out, grad_out)
        kernels, arrays = _select(backend, features, centers, out, grad_out, stream=stream, sync=sync)
        checked = validation.validate_center_loss(features, labels, centers, alpha, rule, out, arrays, grad_out)
    batch_size, feature_size = checked.features.shape
    coefficients = rule_coefficients(checked.rule, checked.alpha, batch_size, feature_size)

    # the outputs are allocated before out is first written, so that running out of memory
    # leaves it as it was
    grad = checked.grad_out if grad_out is not None else arrays.empty(checked.features.shape, checked.features.dtype)
    grad_centers = None if coefficients.moves_centers else arrays.zeros(checked.centers.shape, checked.centers.dtype)
    target, copy_from = _target(arrays, checked.centers, checked.out, checked.out_is_centers)
    written = target if coefficients.moves_centers else grad_centers
    loss = kernels.center_loss_step(
        checked.features, checked.labels, target, grad, written, coefficients, deterministic=deterministic,
        copy_from=copy_from,
    )
    if plain is not None:
        # out (index 3), when given, is the centers: it overlaps neither features nor labels; nor
        # does grad_out (index 4) overlap them or the centers
        overlaps = (((3, 0), (3, 1)) if out is not None else ()) + (((4, 0), (4, 1), (4, 2)) if grad_out is not None
                                                                   else ())
        kernels.repeat.remember(remembered, inputs, (loss, grad, target, grad_centers), overlaps, arrays)
    return _center_loss_result(loss, grad, target, grad_centers, caller_out, caller_grad_out, to_caller)


def _identity(x: Any) -> Any:
    return x


def _center_loss_result(loss, grad, target, grad_centers, caller_out, caller_grad_out, to_caller) -> CenterLossResult:
    """The result of a step whose outputs are ``loss`` (a float, or a device array of the
    backend's), ``grad``, ``target`` (the centers written) and ``grad_centers`` (None unless
    the rule leaves the centers to the caller), taken to the caller's framework with
    ``to_caller``; the caller's ``out`` and ``grad_out`` are told they were written."""
    if caller_out is not None and grad_centers is None:  # the rule moved the centers
        interop.mark_written(caller_out)
    if caller_grad_out is not None:
        interop.mark_written(caller_grad_out)
    return CenterLossResult(
        loss=loss if isinstance(loss, float) else to_caller(loss),
        grad=caller_grad_out if caller_grad_out is not None else to_caller(grad),
        centers=caller_out if caller_out is not None else to_caller(target),
        grad_centers=None if grad_centers is None else to_caller(grad_centers),
    )
