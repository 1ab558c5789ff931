"""The cuda backend's calls share nothing but compiled kernels and the error record: temporaries
per call from the caller's allocator, calls on several streams and host threads, the record's
protocol, host labels, graph capture. Collected only where the cuda backend runs (a GPU, or the
simulator in ``make test-cudasim``)."""

import threading
from contextlib import nullcontext

import numpy as np
import pytest
from numba import cuda

import centerkern
import centerkern.cuda
from centerkern.cuda import arrays as cuda_arrays
from centerkern.cuda import driver
from centerkern.cuda import kernels
from centerkern.cuda import record

from conftest import SIMULATED, assert_matches, to_host


def _batch(seed, batch=24, width=3, classes=6, hot_share=0.5):
    rng = np.random.default_rng(seed)
    labels = np.where(rng.random(batch) < hot_share, rng.integers(0, 2, batch), rng.integers(0, classes, batch))
    return (rng.standard_normal((batch, width)).astype(np.float32), labels,
            rng.standard_normal((classes, width)).astype(np.float32))


def _device(*host):
    return tuple(cuda.to_device(a) for a in host)


@pytest.fixture
def temporaries(monkeypatch):
    """Every temporary a call makes, as its size in bytes, and how often they were given back."""
    made, released = [], []
    real_temporary, real_release = cuda_arrays.DeviceArrays.temporary, cuda_arrays.DeviceArrays.release

    def temporary(self, size):
        made.append(size)
        return real_temporary(self, size)

    def release(self):
        released.append(self)
        return real_release(self)

    monkeypatch.setattr(cuda_arrays.DeviceArrays, "temporary", temporary)
    monkeypatch.setattr(cuda_arrays.DeviceArrays, "release", release)
    return made, released


@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_one_temporary_per_call_and_nothing_k_by_d(temporaries, deterministic):
    """A step makes one temporary (its counters of 1 + 3K int32, the spanning table, the sums and
    the rest, carved from it) and gives it back; with many classes it is nowhere near K x D."""
    made, released = temporaries
    features, labels, centers = _batch(1, batch=20, width=5, classes=1000, hot_share=0.5)
    reference = centerkern.center_loss(features, labels, centers, 0.5, backend="numpy")
    device_centers = cuda.to_device(centers)
    for _ in range(2):
        made.clear()
        result = centerkern.center_loss(*_device(features, labels), device_centers, 0.5, out=device_centers,
                                        deterministic=deterministic)
        layout = driver._step_layout(20, 1000, 5, deterministic)
        assert made == [layout.size]
        assert layout.parts["counters"][1] == (kernels.COUNTER_FIELDS + kernels.BOOK_ROWS * 1000,)
        assert layout.parts["keys"][1] == (10,)  # a slot for each class that can span: min(K, B // 2)
        assert layout.size < centers.nbytes  # sized by K and B, not by K x D
        device_centers = cuda.to_device(centers)
    assert len(released) == 2  # one release per call, after its launches
    assert float(to_host(result.loss)) == pytest.approx(reference.loss, rel=1e-9)
    assert_matches(result.centers, reference.centers, features, centers)


def test_cuda_layout_clears_what_starts_at_zero_and_aligns_every_part():
    """The memset clears the counters and the keys (the default mode's sums are cleared row by row
    by the runs that claim them); every part sits at an offset its dtype aligns, none overlaps the
    next."""
    for deterministic in (False, True):
        layout = driver._step_layout(7 * kernels.TILE_ROWS, 50, 9, deterministic)
        placed = sorted(layout.parts.values(), key=lambda part: part[0])
        for (offset, shape, dtype), (next_offset, _, _) in zip(placed, placed[1:] + [(layout.size, None, None)]):
            assert offset % dtype.itemsize == 0 and offset + np.prod(shape) * dtype.itemsize <= next_offset
        _, sums_shape, _ = layout.parts["spanning_sums"]
        cleared_to = layout.parts["keys"][0] + 4 * layout.parts["keys"][1][0]
        assert layout.zero_bytes == cleared_to
        assert sums_shape[0] == (7 * kernels.TILE_ROWS if deterministic else driver.spanning_slots(7 * kernels.TILE_ROWS, 50))


def test_cuda_spanning_slots_bound_what_can_span():
    tile = kernels.TILE_ROWS
    assert driver.spanning_slots(batch_size=100 * tile, num_classes=10**6) == 50 * tile
    assert driver.spanning_slots(batch_size=100 * tile, num_classes=3) == 3
    assert driver.spanning_slots(batch_size=1, num_classes=5) == 1  # never an empty table


def test_cuda_calls_on_two_streams_interleaved():
    """Calls on two streams, queued one after the other with nothing ordering them: each equals
    its reference (there is no state for them to share)."""
    first, second = _batch(2, batch=30), _batch(3, batch=17, classes=4)
    references = [centerkern.center_loss(f, y, c, 0.5, rule="wen", backend="numpy") for f, y, c in (first, second)]
    streams = [cuda.stream(), cuda.stream()]
    results = []
    for (features, labels, centers), stream in zip((first, second, first, second), streams * 2):
        results.append(centerkern.center_loss(*_device(features, labels, centers), 0.5, rule="wen", sync=False,
                                              stream=stream))
    for stream in streams:
        stream.synchronize()
    centerkern.cuda.check_errors()
    for index, result in enumerate(results):
        reference, (features, _, centers) = references[index % 2], (first, second)[index % 2]
        assert float(to_host(result.loss)) == pytest.approx(reference.loss, rel=1e-9)
        assert_matches(result.centers, reference.centers, features, centers)


def test_cuda_calls_from_two_host_threads_at_once():
    """Two host threads, each making steps with a bad label now and then: each thread's results
    equal its reference, and each thread's own sync=True calls raise exactly its own bad labels."""
    barrier, failures = threading.Barrier(2), []

    def work(seed):
        try:
            features, labels, centers = _batch(seed, batch=20 + seed, classes=5)
            reference = centerkern.center_loss(features, labels, centers, 0.5, backend="numpy")
            barrier.wait()
            for _ in range(3):
                result = centerkern.center_loss(*_device(features, labels, centers), 0.5)
                assert float(to_host(result.loss)) == pytest.approx(reference.loss, rel=1e-9)
                assert_matches(result.centers, reference.centers, features, centers)
                bad = labels.copy()
                bad[seed] = 5 + seed
                with pytest.raises(IndexError, match=f"label {5 + seed} at position {seed} "):
                    centerkern.center_loss(*_device(features, bad, centers), 0.5)
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            failures.append(error)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def _fresh_record():
    """A record of its own (not the device's), for the protocol's tests."""
    with nullcontext() if SIMULATED else cuda.gpus[0]:
        return record.ErrorRecord(-1, 0)


@cuda.jit
def _post_many(record_array, positions):
    i = cuda.grid(1)
    if i < positions.size:
        kernels._post(record_array, positions[i], 100 + positions[i], 7, 0)


def _position(error) -> int:
    return int(str(error).split(" at position ")[1].split()[0])


def test_cuda_record_posts_from_many_threads_take_distinct_tickets():
    """Threads posting at once each take a ticket of their own; past the ring's size the oldest
    tickets' slots are reused, and the host counts those as dropped and tells them with the
    next error it raises."""
    log = _fresh_record()
    posts = kernels.RECORD_SLOTS + 3
    positions = cuda.to_device(np.arange(posts, dtype=np.int64))
    _post_many[2, 16](log.view.numba(), positions)
    cuda.synchronize()
    assert log.host[kernels.WRITTEN] == posts
    marks = [log.host[kernels.RECORD_HEADER + slot * kernels.SLOT_FIELDS] for slot in range(kernels.RECORD_SLOTS)]
    assert sorted(marks) == list(range(4, posts + 1))  # every slot complete, holding one of the newest tickets
    seen = []
    for index in range(kernels.RECORD_SLOTS):
        error = log.take()
        assert isinstance(error, IndexError)
        seen.append(_position(error))
        notes = getattr(error, "__notes__", [])
        assert (notes != []) == (index == 0)  # the drops are told once, with the first error
        if index == 0:
            assert "3 more call(s)" in notes[0]
    assert log.take() is None
    assert len(set(seen)) == kernels.RECORD_SLOTS  # no verdict taken twice


def _write_slot(host, ticket, fields, mark):
    base = kernels.RECORD_HEADER + (ticket % kernels.RECORD_SLOTS) * kernels.SLOT_FIELDS
    host[base + 1:base + 5] = fields
    host[base] = mark


def test_cuda_record_slot_being_written_is_left_for_the_next_look():
    """The host looks while the device writes a slot (its mark says so): it takes nothing, and
    finds the verdict at its next look; a verdict posted meanwhile waits in its own slot. (The
    host stands in for the device here; the real host never writes the record.)"""
    log = _fresh_record()
    host = log.host
    host[kernels.WRITTEN] = 1  # the device took ticket 0 ...
    _write_slot(host, 0, (4, 9, 6, 0), -1)  # ... and is writing its slot
    assert log.take() is None and log.taken == 0
    _write_slot(host, 0, (4, 9, 6, 0), 1)  # complete
    host[kernels.WRITTEN] = 2  # a second bad call takes ticket 1 while the host reads ticket 0
    assert "label 9 at position 4" in str(log.take())
    assert log.take() is None  # ticket 1 not complete yet
    _write_slot(host, 1, (2, -3, 6, 1), 2)
    assert "label -3 at position 2" in str(log.take())
    assert log.take() is None


def test_cuda_record_overwritten_slots_are_dropped_never_taken_twice(monkeypatch):
    """A slot that a newer ticket reuses before the host looks, or while it reads the fields, is
    counted as dropped: the host never takes a verdict made of two posts' fields."""
    log = _fresh_record()
    host = log.host
    for ticket in range(1, kernels.RECORD_SLOTS + 2):  # ticket 0's slot reused by ticket 16
        _write_slot(host, ticket, (ticket, 50 + ticket, 99, 0), ticket + 1)
    host[kernels.WRITTEN] = kernels.RECORD_SLOTS + 2
    first = log.take()
    assert _position(first) == 2 and "2 more call(s)" in first.__notes__[0]  # tickets 0 and 1 lost
    # the slot of ticket 3 is reused by ticket 19 between the host's two reads of its mark
    reads = iter([4, 20])
    real_mark = log._mark
    monkeypatch.setattr(log, "_mark", lambda ticket: next(reads) if ticket == 3 else real_mark(ticket))
    second = log.take()
    assert _position(second) == 4 and "1 more call(s)" in second.__notes__[0]


def test_cuda_more_bad_calls_than_slots_each_raised_once_when_checked_between():
    """More sync=False bad calls than the record has slots, with check_errors() after each: every
    one is raised exactly once, in order, and none is told as dropped."""
    features, labels, centers = _batch(11, batch=12, classes=4)
    for call in range(kernels.RECORD_SLOTS + 4):
        bad = labels.copy()
        bad[call % 12] = 100 + call
        centerkern.center_loss(*_device(features, bad, centers), 0.5, sync=False)
        with pytest.raises(IndexError, match=f"label {100 + call} at position {call % 12} ") as raised:
            centerkern.cuda.check_errors()
        assert not getattr(raised.value, "__notes__", [])
    centerkern.cuda.check_errors()


def test_cuda_sync_false_bad_calls_are_raised_in_order_each_once():
    features, labels, centers = _batch(5, batch=12, classes=4)
    first, second = labels.copy(), labels.copy()
    first[3], second[7] = 43, 47
    centerkern.center_loss(*_device(features, first, centers), 0.5, sync=False)
    cuda.synchronize()  # the first call has finished: the next call raises its label before it runs
    with pytest.raises(IndexError, match="label 43 at position 3 "):
        centerkern.center_loss(*_device(features, second, centers), 0.5, sync=False)
    centerkern.center_loss(*_device(features, second, centers), 0.5, sync=False)
    with pytest.raises(IndexError, match="label 47 at position 7 "):
        centerkern.cuda.check_errors()
    centerkern.cuda.check_errors()
    centerkern.cuda.check_errors(device=0)


def test_cuda_sync_true_call_raises_its_own_label_not_an_earlier_calls():
    """A sync=True call reads its own verdict; an earlier sync=False call's bad label is raised
    before it writes, and a pending one never stands in for the call's own."""
    features, labels, centers = _batch(6, batch=12, classes=4)
    earlier = labels.copy()
    earlier[2] = 11
    centerkern.center_loss(*_device(features, earlier, centers), 0.5, sync=False)
    cuda.synchronize()
    device_centers = cuda.to_device(centers)
    with pytest.raises(IndexError, match="label 11 at position 2 "):
        centerkern.center_loss(*_device(features, labels), device_centers, 0.5, out=device_centers)
    np.testing.assert_array_equal(to_host(device_centers), centers)  # raised before writing
    own = labels.copy()
    own[9] = 12
    with pytest.raises(IndexError, match="label 12 at position 9 "):
        centerkern.center_loss(*_device(features, own, centers), 0.5)
    centerkern.cuda.check_errors()  # the sync=True call posted nothing


def test_cuda_host_labels_with_device_features():
    """Host labels are copied onto the call's stream; under graph capture, where that cannot be,
    the conversion says to move them to the device first."""
    features, labels, centers = _batch(7)
    reference = centerkern.center_loss(features, labels, centers, 0.5, backend="numpy")
    device_centers = cuda.to_device(centers)
    result = centerkern.center_loss(cuda.to_device(features), labels, device_centers, 0.5, out=device_centers)
    assert_matches(device_centers, reference.centers, features, centers)
    assert float(to_host(result.loss)) == pytest.approx(reference.loss, rel=1e-9)
    arrays = cuda_arrays.DeviceArrays(cuda.to_device(features), sync=False)
    arrays.capturing = True  # as a call on torch tensors under capture sees it
    with pytest.raises(ValueError, match="move labels to the device before capturing"):
        arrays.asarray(labels, "labels")


def test_cuda_under_capture_what_cannot_be_captured_is_refused_before_writing(monkeypatch):
    """Under capture (as the driver sees it) a call must be sync=False, and not on Numba arrays,
    whose results are freed when dropped rather than with a graph: both refused, nothing written."""
    monkeypatch.setattr(cuda_arrays, "is_capturing", lambda handle: True)
    features, labels, centers = _batch(8, batch=30)
    device_centers = cuda.to_device(centers)
    with pytest.raises(ValueError, match="pass sync=False to capture"):
        centerkern.center_loss(*_device(features, labels), device_centers, 0.5, out=device_centers)
    with pytest.raises(ValueError, match="Numba device arrays cannot be captured"):
        centerkern.center_loss(*_device(features, labels), device_centers, 0.5, out=device_centers, sync=False)
    np.testing.assert_array_equal(to_host(device_centers), centers)


def _fake_cupy(allocator_owner):
    """The parts of CuPy a call's memory reads, with an allocator bound to ``allocator_owner``."""
    import types

    class MemoryPool:
        def malloc(self, size):
            raise AssertionError("nothing is allocated in this test")

    class MemoryAsyncPool(MemoryPool):
        pass

    module = types.ModuleType("cupy")
    owner = {"default": MemoryPool, "async": MemoryAsyncPool}[allocator_owner]()
    module.cuda = types.SimpleNamespace(
        Device=lambda ordinal: nullcontext(), get_current_stream=lambda: types.SimpleNamespace(ptr=0),
        MemoryPool=MemoryPool, MemoryAsyncPool=MemoryAsyncPool, get_allocator=lambda: owner.malloc)
    return module


class _CupyLikeArray:
    device = type("Device", (), {"id": 0})()


_CupyLikeArray.__module__ = "cupy"  # how centerkern knows a CuPy array: the module of its type


def test_cuda_capture_of_cupy_arrays_needs_its_stream_ordered_allocator(monkeypatch):
    """CuPy's default pool hands memory a graph replays into to later arrays: a capture is refused
    unless CuPy allocates in stream order (MemoryAsyncPool), and the message says how."""
    import sys

    monkeypatch.setattr(cuda_arrays, "is_capturing", lambda handle: True)
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy("default"))
    with pytest.raises(ValueError, match=r"cupy.cuda.set_allocator\(cupy.cuda.MemoryAsyncPool\(\).malloc\)"):
        cuda_arrays.DeviceArrays(_CupyLikeArray(), sync=False)
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy("async"))
    arrays = cuda_arrays.DeviceArrays(_CupyLikeArray(), sync=False)
    assert arrays.capturing and arrays.memory.name == "cupy"
    with pytest.raises(ValueError, match="pass sync=False to capture"):  # sync=True never captures
        cuda_arrays.DeviceArrays(_CupyLikeArray(), sync=True)


def test_cuda_batch_past_the_int32_bookkeeping_is_refused_before_writing(monkeypatch):
    monkeypatch.setattr(driver, "MOST_ROWS", 10)
    features, labels, centers = _batch(10, batch=11)
    device_centers = cuda.to_device(centers)
    with pytest.raises(ValueError, match="at most 10 rows per call, got 11"):
        centerkern.center_loss(*_device(features, labels), device_centers, 0.5, out=device_centers)
    np.testing.assert_array_equal(to_host(device_centers), centers)


def test_cuda_first_run_script_runs_small(tmp_path):
    """benchmarks/gpu_first_run.py (the first stages of a GPU run) at its smallest: every stage
    passes, or says why it cannot run here; the verdicts are written as JSON."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_first_run.py"
    spec = importlib.util.spec_from_file_location("gpu_first_run", path)
    first_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(first_run)
    assert first_run.main([str(tmp_path), "--small"]) == 0
    report = json.loads((tmp_path / "first-run.json").read_text())
    stages = report["stages"]
    assert list(stages) == ["preflight", "direct_launch", "no_host_wait", "streams_and_threads", "bad_labels",
                            "graph_capture", "memory"]
    for name, entry in stages.items():
        assert entry["verdict"] in ("passed", "not possible here"), (name, entry)
    assert stages["direct_launch"]["verdict"] == "passed" and stages["direct_launch"]["cases"]
    assert all(case["same_bits_as_numbas_launch"] and case["equals_reference"]
               for case in stages["direct_launch"]["cases"])
    assert stages["bad_labels"]["verdict"] == "passed"
    assert str(2**64 - 1) in stages["bad_labels"]["uint64_message"]
    if SIMULATED:
        assert stages["graph_capture"]["verdict"] == "not possible here"
    assert first_run.main(["--sanitized-case"]) == 0  # what compute-sanitizer runs on a GPU
