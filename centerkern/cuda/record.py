"""The one thing calls share besides compiled kernels: each device context's record of bad labels.

A call made with ``sync=False`` returns before its labels are checked; its last kernel posts a
bad label to the record of its device context, host-mapped memory that the host reads without
waiting. The next call on that device (or ``check_errors``) raises what it finds there.

Only the device writes the record, and it never reads what the host writes: the CUDA memory
model promises nothing about device reads of memory the host writes concurrently (no
``.sys``-scope atomics or volatile loads in Numba, and ``hostNativeAtomicSupported`` is 0 on PCIe
hosts). The record is a ticket counter, ``WRITTEN``, and a ring of ``kernels.RECORD_SLOTS``
slots (see ``kernels._post``): a posting kernel takes a ticket with one atomic add on the
counter and writes slot ``ticket % RECORD_SLOTS`` seqlock-style, its mark saying "being written"
(``-(ticket + 1)``) before the fields and "complete" (``ticket + 1``) after them. The host keeps
the next ticket it will take on its own side. It takes a ticket only from a slot marked complete
for that very ticket, re-reading the mark after the fields, so that it never takes a half-written
or overwritten verdict; a ticket whose slot a newer one has reused (``RECORD_SLOTS`` bad calls
nobody looked for) is counted as dropped and told with the next error raised.

The record's memory is pinned host memory of the context, allocated with the driver
(``cuMemHostAlloc``), not through Numba: ``numba.cuda.close()`` frees what Numba allocated while
the context itself may live on (torch holds it). A record is known by its context's unique id;
``check_errors`` reads only records whose context is still the device's current one.

Limits: two posts whose tickets are ``RECORD_SLOTS`` apart share a slot with nothing to order
them, so with more than ``RECORD_SLOTS`` bad calls in flight at once one of them may be lost (or,
in a narrow window, read torn); and the host's re-read of the mark relies on its loads keeping
their order, as x86 keeps it (an ARM host would want an acquire fence between them).

Which host thread raises a verdict is not chosen: a bad label of a ``sync=False`` call made in
one thread is raised by whichever call (or ``check_errors``) on that device looks next, in any
thread.
"""

from __future__ import annotations

import ctypes
import threading
from contextlib import nullcontext
from typing import Any

import numpy as np
from numba import cuda

from .._core.errors import label_out_of_range
from . import kernels
from .launcher import current_context_id
from .views import DeviceView, simulated


class _PinnedRecordMemory:
    """The record's pinned, device-mapped host memory, allocated with the driver. It is never
    freed: one record per context, for the life of the process (the context frees it if it is
    destroyed first)."""

    def __init__(self):
        from cuda.bindings import driver as cuda_driver

        size = kernels.RECORD_SIZE * 8
        flags = cuda_driver.CU_MEMHOSTALLOC_DEVICEMAP | cuda_driver.CU_MEMHOSTALLOC_PORTABLE
        error, host_pointer = cuda_driver.cuMemHostAlloc(size, flags)
        if error != 0:
            raise MemoryError(f"cuMemHostAlloc of the error record failed: {error.name}")
        error, device_pointer = cuda_driver.cuMemHostGetDevicePointer(host_pointer, 0)
        if error != 0:
            raise MemoryError(f"cuMemHostGetDevicePointer of the error record failed: {error.name}")
        self.host = np.ctypeslib.as_array((ctypes.c_int64 * kernels.RECORD_SIZE).from_address(int(host_pointer)))
        self.device_pointer = int(device_pointer)
        self.__cuda_array_interface__ = {"shape": (kernels.RECORD_SIZE,), "typestr": "<i8", "strides": None,
                                         "data": (self.device_pointer, False), "version": 3, "stream": None}


class ErrorRecord:
    """One device context's record: its memory, and the host's side of the protocol."""

    def __init__(self, context_id: int, device_ordinal: int):
        self.context_id = context_id
        self.device_ordinal = device_ordinal
        if simulated():
            mapped = cuda.mapped_array(kernels.RECORD_SIZE, dtype=np.int64)
            self.host = getattr(mapped, "_ary", mapped)  # the simulator wraps its NumPy array
            self.host[:] = 0
            self.view = DeviceView.of(mapped, None)
        else:
            memory = _PinnedRecordMemory()
            self.host = memory.host
            self.host[:] = 0  # before any kernel can post: the device never reads what the host writes later
            self.view = DeviceView(memory, memory.device_pointer, (kernels.RECORD_SIZE,), (8,),
                                   np.dtype(np.int64), False, None)
        self.taken = 0  # the next ticket to take: the host's side, which the device never sees
        self._dropped_untold = 0
        self._lock = threading.Lock()  # two host threads must not take one verdict twice

    def _mark(self, ticket: int) -> int:
        return int(self.host[kernels.RECORD_HEADER + (ticket % kernels.RECORD_SLOTS) * kernels.SLOT_FIELDS])

    def take(self) -> IndexError | None:
        """The oldest complete verdict not yet taken, as the error to raise (and take it)."""
        record = self.host
        with self._lock:
            while True:
                written = int(record[kernels.WRITTEN])
                if written == self.taken:
                    return None
                if written - self.taken > kernels.RECORD_SLOTS:  # the oldest tickets' slots are reused
                    self._dropped_untold += written - kernels.RECORD_SLOTS - self.taken
                    self.taken = written - kernels.RECORD_SLOTS
                expected = self.taken + 1
                mark = self._mark(self.taken)
                if mark != expected:
                    if abs(mark) > expected:  # a newer ticket has this slot: ours is lost
                        self._dropped_untold += 1
                        self.taken += 1
                        continue
                    return None  # claimed, still being written: the next look finds it
                base = kernels.RECORD_HEADER + (self.taken % kernels.RECORD_SLOTS) * kernels.SLOT_FIELDS
                position, value, num_classes, negative = (int(v) for v in record[base + 1:base + 5])
                if self._mark(self.taken) != expected:  # overwritten while read: ours is lost
                    self._dropped_untold += 1
                    self.taken += 1
                    continue
                self.taken += 1
                dropped, self._dropped_untold = self._dropped_untold, 0
                break
        if value < 0 and not negative:
            value += 2**64  # an unsigned label, reported as the caller wrote it
        error = label_out_of_range(position, value, num_classes)
        if dropped and hasattr(error, "add_note"):
            error.add_note(f"{dropped} more call(s) on this device had bad labels that were not recorded: "
                           f"more than {kernels.RECORD_SLOTS} went unchecked (call check_errors() more often)")
        return error


_records: dict[int, ErrorRecord] = {}
_creating = threading.Lock()


def for_context(context_id: int, device_ordinal: int) -> ErrorRecord:
    """The record of the current device context (whose unique id is ``context_id``), made on
    first use."""
    record = _records.get(context_id)
    if record is None:
        with _creating:
            record = _records.get(context_id)
            if record is None:
                record = _records[context_id] = ErrorRecord(context_id, device_ordinal)
    return record


def check_errors(device: Any = None) -> None:
    """Wait for the GPU, then raise the ``IndexError`` of a bad label left by a call made with
    ``sync=False`` (SPEC: "Device arrays"), if there is one.

    ``device`` (an ordinal) checks that device only; by default every device that has run a
    call of this backend is checked. Each bad label is raised once, oldest first."""
    records = list(_records.values())
    if device is not None:
        records = [r for r in records if r.device_ordinal == int(device)]
    for record in records:
        with nullcontext() if simulated() else cuda.gpus[record.device_ordinal]:
            if not simulated():
                cuda.current_context()  # made current, if it was not yet
            if current_context_id() != record.context_id:
                # its context is gone (numba.cuda.close(), or a reset): so is its memory, and
                # every call it recorded was of that context
                _records.pop(record.context_id, None)
                continue
            cuda.synchronize()
        error = record.take()
        if error is not None:
            raise error
