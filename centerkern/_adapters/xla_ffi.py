"""A Python function as an XLA FFI handler: XLA's buffers in place, no host callback.

XLA calls an FFI handler with a pointer to an ``XLA_FFI_CallFrame`` (``xla/ffi/api/c_api.h``,
shipped with jaxlib under ``jax.ffi.include_dir()``): the argument and result buffers as
pointers with a dtype and dimensions, and the API's function table, from which a handler makes
the errors it returns. The structures below are that header's, field for field; ``handler``
wraps a Python function as a C-callable handler that XLA runs on the buffers where they are
(on the CPU: host memory, read and written in place as NumPy views).

XLA may also call a handler to ask which API version it was built for: a call frame carrying the
metadata extension. The handler answers it (version 0.1, no traits) and returns.
"""

from __future__ import annotations

import ctypes
from typing import Callable

import numpy as np

API_MAJOR, API_MINOR = 0, 1  # the version whose structures are declared here
EXECUTE_STAGE = 3
METADATA_EXTENSION = 1
ERROR_INVALID_ARGUMENT, ERROR_OUT_OF_RANGE, ERROR_INTERNAL = 3, 11, 13

_DTYPES = {1: np.bool_, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.uint8, 7: np.uint16,
           8: np.uint32, 9: np.uint64, 10: np.float16, 11: np.float32, 12: np.float64}


class _ExtensionBase(ctypes.Structure):
    pass


_ExtensionBase._fields_ = [("struct_size", ctypes.c_size_t), ("type", ctypes.c_int),
                           ("next", ctypes.POINTER(_ExtensionBase))]


class _ApiVersion(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.POINTER(_ExtensionBase)),
                ("major_version", ctypes.c_int), ("minor_version", ctypes.c_int)]


class _Metadata(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("api_version", _ApiVersion), ("traits", ctypes.c_uint32)]


class _MetadataExtension(ctypes.Structure):
    _fields_ = [("extension_base", _ExtensionBase), ("metadata", ctypes.POINTER(_Metadata))]


class _Buffer(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.POINTER(_ExtensionBase)),
                ("dtype", ctypes.c_int), ("data", ctypes.c_void_p), ("rank", ctypes.c_int64),
                ("dims", ctypes.POINTER(ctypes.c_int64))]


class _Args(ctypes.Structure):  # XLA_FFI_Args and XLA_FFI_Rets have one layout
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.POINTER(_ExtensionBase)),
                ("size", ctypes.c_int64), ("types", ctypes.POINTER(ctypes.c_int)),
                ("args", ctypes.POINTER(ctypes.c_void_p))]


class _Attrs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.POINTER(_ExtensionBase)),
                ("size", ctypes.c_int64), ("types", ctypes.c_void_p), ("names", ctypes.c_void_p),
                ("attrs", ctypes.c_void_p)]


class _ErrorCreateArgs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.POINTER(_ExtensionBase)),
                ("message", ctypes.c_char_p), ("errc", ctypes.c_int)]


class _StreamGetArgs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.POINTER(_ExtensionBase)),
                ("ctx", ctypes.c_void_p), ("stream", ctypes.c_void_p)]


class _ErrorArgs(ctypes.Structure):  # XLA_FFI_Error_GetMessage_Args and XLA_FFI_Error_Destroy_Args
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.POINTER(_ExtensionBase)),
                ("error", ctypes.c_void_p), ("message", ctypes.c_char_p)]


_ErrorCreate = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_ErrorCreateArgs))
_ErrorCall = ctypes.CFUNCTYPE(None, ctypes.POINTER(_ErrorArgs))
_StreamGet = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_StreamGetArgs))


class _Api(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.POINTER(_ExtensionBase)),
                ("api_version", _ApiVersion), ("internal_api", ctypes.c_void_p),
                ("error_create", _ErrorCreate), ("error_get_message", _ErrorCall),
                ("error_destroy", _ErrorCall), ("handler_register", ctypes.c_void_p),
                ("stream_get", _StreamGet)]


class _CallFrame(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.POINTER(_ExtensionBase)),
                ("api", ctypes.POINTER(_Api)), ("ctx", ctypes.c_void_p), ("stage", ctypes.c_int),
                ("args", _Args), ("rets", _Args), ("attrs", _Attrs), ("future", ctypes.c_void_p)]


_Handler = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_CallFrame))


class Buffer:
    """One argument or result: its address, dtype and shape, and (for host memory) a NumPy view."""

    def __init__(self, address: int):
        buffer = _Buffer.from_address(address)
        self.pointer = buffer.data or 0
        if buffer.dtype not in _DTYPES:
            raise TypeError(f"a buffer of XLA dtype {buffer.dtype}, which no kernel here takes")
        self.dtype = np.dtype(_DTYPES[buffer.dtype])
        self.shape = tuple(buffer.dims[i] for i in range(buffer.rank))

    def host_array(self) -> np.ndarray:
        """The buffer as a writable NumPy array over the same memory (no copy)."""
        size = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        if size == 0:
            return np.empty(self.shape, self.dtype)
        memory = (ctypes.c_char * size).from_address(self.pointer)
        return np.frombuffer(memory, dtype=self.dtype).reshape(self.shape)


class CallError(Exception):
    """Raised by a handler's function to return an XLA FFI error with this code."""

    def __init__(self, message: str, code: int = ERROR_INVALID_ARGUMENT):
        super().__init__(message)
        self.code = code


def _error(frame: _CallFrame, message: str, code: int) -> int:
    text = message.encode("utf-8", "replace")
    args = _ErrorCreateArgs(ctypes.sizeof(_ErrorCreateArgs), None, text, code)
    return frame.api.contents.error_create(ctypes.byref(args))


def stream(frame: _CallFrame) -> int:
    """The platform stream XLA runs the call on (a ``CUstream`` on CUDA)."""
    args = _StreamGetArgs(ctypes.sizeof(_StreamGetArgs), None, frame.ctx, None)
    error = frame.api.contents.stream_get(ctypes.byref(args))
    if error:  # ours to read and destroy
        api = frame.api.contents
        message = _ErrorArgs(ctypes.sizeof(_ErrorArgs), None, error, None)
        api.error_get_message(ctypes.byref(message))
        text = (message.message or b"").decode("utf-8", "replace")
        api.error_destroy(ctypes.byref(_ErrorArgs(ctypes.sizeof(_ErrorArgs), None, error, None)))
        raise RuntimeError(f"XLA did not give the call's stream: {text}")
    return args.stream or 0


def _answer_metadata(frame: _CallFrame) -> bool:
    extension = frame.extension_start
    if not extension or extension.contents.type != METADATA_EXTENSION:
        return False
    metadata = ctypes.cast(extension, ctypes.POINTER(_MetadataExtension)).contents.metadata.contents
    metadata.api_version.major_version, metadata.api_version.minor_version = API_MAJOR, API_MINOR
    metadata.traits = 0
    return True


def handler(function: Callable[[_CallFrame, list, list], None]):
    """A C-callable XLA FFI handler running ``function(frame, arguments, results)`` (lists of
    ``Buffer``) at the execute stage. ``CallError`` becomes an FFI error with its code, any other
    exception an INTERNAL one naming it. Keep the returned object alive while XLA may call it."""

    def call(frame_pointer):
        try:
            frame = frame_pointer.contents
            if _answer_metadata(frame) or frame.stage != EXECUTE_STAGE:
                return None
        except BaseException:  # a metadata query carries no API to make an error with
            return None
        try:
            arguments = [Buffer(frame.args.args[i]) for i in range(frame.args.size)]
            results = [Buffer(frame.rets.args[i]) for i in range(frame.rets.size)]
            function(frame, arguments, results)
        except CallError as error:
            return _error(frame, str(error), error.code)
        except (TypeError, ValueError) as error:
            return _error(frame, f"{type(error).__name__}: {error}", ERROR_INVALID_ARGUMENT)
        except BaseException as error:  # nothing may unwind through XLA's C frames
            return _error(frame, f"{type(error).__name__}: {error}", ERROR_INTERNAL)
        return None

    return _Handler(call)
