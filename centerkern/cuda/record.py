"""The one thing calls share besides compiled kernels: each device context's record of bad labels.

A call made with ``sync=False`` returns before its labels are checked; its last kernel posts a
bad label to the record of its device, host-mapped memory the host reads without waiting. The
next call on that device (or ``check_errors``) raises what it finds there.

The record is a ring of ``kernels.RECORD_SLOTS`` slots (see ``kernels._post``). The device claims
a slot by advancing ``WRITTEN``, fills it and marks it complete last; the host reads a slot only
once it is marked, then advances ``TAKEN``, the one field the host writes. Neither side ever
clears what the other writes, so a verdict posted while the host reads an earlier one waits in
its own slot for the next look: none is lost, however the two interleave. Posts that find the
ring full (``RECORD_SLOTS`` bad calls the host has not looked for) are counted in ``DROPPED``
and told with the next error raised.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from typing import Any

import numpy as np
from numba import cuda

from .._core.errors import label_out_of_range
from . import kernels
from .views import DeviceView, simulated


class ErrorRecord:
    """One device context's record: the mapped array, and the host's side of the protocol."""

    def __init__(self, context: Any, device_ordinal: int):
        self.context = context  # held, so that its id() keys this record alone
        self.device_ordinal = device_ordinal
        self._mapped = cuda.mapped_array(kernels.RECORD_SIZE, dtype=np.int64)
        self.host = getattr(self._mapped, "_ary", self._mapped)  # the simulator wraps its NumPy array
        self.host[:] = 0
        self.view = DeviceView.of(self._mapped, None)
        self._dropped_told = 0
        self._lock = threading.Lock()  # two host threads must not take one verdict twice

    def take(self) -> IndexError | None:
        """The oldest complete verdict not yet taken, as the error to raise (and take it)."""
        record = self.host
        with self._lock:
            taken = int(record[kernels.TAKEN])
            if int(record[kernels.WRITTEN]) == taken:
                return None
            base = kernels.RECORD_HEADER + (taken % kernels.RECORD_SLOTS) * kernels.SLOT_FIELDS
            if int(record[base]) != taken + 1:
                return None  # claimed, still being written: the next look finds it
            position, value, num_classes, negative = (int(v) for v in record[base + 1:base + 5])
            record[kernels.TAKEN] = taken + 1  # only now may the device reuse the slot
            dropped = int(record[kernels.DROPPED]) - self._dropped_told
            self._dropped_told += dropped
        if value < 0 and not negative:
            value += 2**64  # an unsigned label, reported as the caller wrote it
        error = label_out_of_range(position, value, num_classes)
        if dropped and hasattr(error, "add_note"):
            error.add_note(f"{dropped} more call(s) on this device had bad labels that were not recorded: "
                           f"more than {kernels.RECORD_SLOTS} went unchecked (call check_errors() more often)")
        return error


_records: dict[int, ErrorRecord] = {}
_creating = threading.Lock()


def _context_key(context: Any) -> int:
    # Numba keeps one context object per device until cuda.close(); a record holds its context,
    # so the id cannot be reused while the record lives. (The simulator makes a new context
    # object at every request, all standing for its one device.)
    return 0 if simulated() else id(context)


def for_current_context(device_ordinal: int) -> ErrorRecord:
    """The record of the current device context, made on first use."""
    context = cuda.current_context()
    key = _context_key(context)
    record = _records.get(key)
    if record is None or (record.context is not context and not simulated()):
        with _creating:
            record = _records.get(key)
            if record is None or (record.context is not context and not simulated()):
                record = _records[key] = ErrorRecord(context, device_ordinal)
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
            cuda.synchronize()
        error = record.take()
        if error is not None:
            raise error
