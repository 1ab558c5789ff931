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
    """Every temporary a call makes, as (shape, dtype, zeroed), and how often they were given back."""
    made, released = [], []
    real_temporary, real_release = cuda_arrays.DeviceArrays.temporary, cuda_arrays.DeviceArrays.release

    def temporary(self, shape, dtype, zeroed=False):
        made.append((tuple(shape), np.dtype(dtype), zeroed))
        return real_temporary(self, shape, dtype, zeroed)

    def release(self):
        released.append(self)
        return real_release(self)

    monkeypatch.setattr(cuda_arrays.DeviceArrays, "temporary", temporary)
    monkeypatch.setattr(cuda_arrays.DeviceArrays, "release", release)
    return made, released


@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_temporaries_are_per_call_and_nothing_k_by_d(temporaries, deterministic):
    """A step makes three temporaries (zeroed int32 counters of 3 + 4K, int64 and float64
    scratch) and gives them back; with many classes none is anywhere near K x D."""
    made, released = temporaries
    features, labels, centers = _batch(1, batch=20, width=5, classes=1000, hot_share=0.5)
    reference = centerkern.center_loss(features, labels, centers, 0.5, backend="numpy")
    device_centers = cuda.to_device(centers)
    for _ in range(2):
        made.clear()
        result = centerkern.center_loss(*_device(features, labels), device_centers, 0.5, out=device_centers,
                                        deterministic=deterministic)
        assert [(dtype, zeroed) for _, dtype, zeroed in made] == [
            (np.dtype(np.int32), True), (np.dtype(np.int64), False), (np.dtype(np.float64), False)]
        assert made[0][0] == (kernels.COUNTER_FIELDS + kernels.BOOK_ROWS * 1000,)
        assert all(np.prod(shape) < 1000 * 5 for shape, _, _ in made[1:])  # sized by B, not by K x D
        device_centers = cuda.to_device(centers)
    assert len(released) == 2  # one release per call, after its launches
    assert float(to_host(result.loss)) == pytest.approx(reference.loss, rel=1e-9)
    assert_matches(result.centers, reference.centers, features, centers)


def test_cuda_spanning_rows_bound_what_can_span():
    tile = kernels.TILE_ROWS
    assert driver.spanning_rows(batch_size=100 * tile, num_classes=10**6, deterministic=False) == 50 * tile
    assert driver.spanning_rows(batch_size=100 * tile, num_classes=3, deterministic=False) == 3
    assert driver.spanning_rows(batch_size=100 * tile, num_classes=3, deterministic=True) == 300
    assert driver.spanning_rows(batch_size=100 * tile, num_classes=10**6, deterministic=True) == 100 * tile
    assert driver.spanning_rows(batch_size=1, num_classes=5, deterministic=False) == 0


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
        return record.ErrorRecord(cuda.current_context(), 0)


@cuda.jit
def _post_many(record_array, positions):
    i = cuda.grid(1)
    if i < positions.size:
        kernels._post(record_array, positions[i], 100 + positions[i], 7, 0)


def test_cuda_record_posts_from_many_threads_claim_distinct_slots():
    """Threads posting at once each claim a slot of their own; past the ring's size the rest are
    counted as dropped, and told with the next error the host raises."""
    log = _fresh_record()
    posts = kernels.RECORD_SLOTS + 3
    positions = cuda.to_device(np.arange(posts, dtype=np.int64))
    _post_many[2, 16](log.view.numba(), positions)
    cuda.synchronize()
    assert log.host[kernels.WRITTEN] == kernels.RECORD_SLOTS and log.host[kernels.DROPPED] == 3
    seen = []
    for index in range(kernels.RECORD_SLOTS):
        error = log.take()
        assert isinstance(error, IndexError)
        seen.append(int(str(error).split(" at position ")[1].split()[0]))
        notes = getattr(error, "__notes__", [])
        assert (notes != []) == (index == 0)  # the drops are told once, with the first error
    assert log.take() is None
    assert len(set(seen)) == kernels.RECORD_SLOTS  # no slot was written twice


def test_cuda_record_slot_claimed_but_not_yet_marked_is_left_for_the_next_look():
    """The interleaving that lost verdicts before: the host looks while the device is between
    claiming a slot and marking it. The host takes nothing then, clears nothing, and finds the
    verdict at its next look; a verdict posted after the host took one waits in its own slot."""
    log = _fresh_record()
    host = log.host
    slot = kernels.RECORD_HEADER
    host[kernels.WRITTEN] = 1  # the device claimed ticket 0 ...
    host[slot + 1:slot + 5] = (4, 9, 6, 0)  # ... and is writing its fields: not yet marked
    assert log.take() is None
    assert host[kernels.TAKEN] == 0 and host[kernels.WRITTEN] == 1  # nothing cleared
    host[slot] = 1  # marked
    second = slot + kernels.SLOT_FIELDS
    host[kernels.WRITTEN] = 2  # a second bad call claims ticket 1 while the host reads ticket 0
    error = log.take()
    assert "label 9 at position 4" in str(error)
    host[second + 1:second + 5] = (2, -3, 6, 1)
    host[second] = 2
    assert "label -3 at position 2" in str(log.take())
    assert log.take() is None


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
    whose results Numba allocates with cuMemAlloc: both refused, nothing written."""
    monkeypatch.setattr(cuda_arrays, "is_capturing", lambda handle: True)
    features, labels, centers = _batch(8, batch=30)
    device_centers = cuda.to_device(centers)
    with pytest.raises(ValueError, match="pass sync=False to capture"):
        centerkern.center_loss(*_device(features, labels), device_centers, 0.5, out=device_centers)
    with pytest.raises(ValueError, match="Numba device arrays cannot be captured"):
        centerkern.center_loss(*_device(features, labels), device_centers, 0.5, out=device_centers, sync=False)
    np.testing.assert_array_equal(to_host(device_centers), centers)


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
