"""centerkern.dask.class_centers against NumPy: many and uneven chunks, chunks across columns,
absent classes, both dtypes; the threaded scheduler, and once a 2-worker LocalCluster."""

import numpy as np
import pytest

dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")

import centerkern.dask as center_dask  # noqa: E402


def _reference(features, labels, num_classes):
    sums = np.zeros((num_classes, features.shape[1]))
    np.add.at(sums, labels, features.astype(np.float64))
    counts = np.bincount(labels, minlength=num_classes)
    return sums / np.maximum(counts, 1)[:, None], counts


def _data(rows=1500, width=9, num_classes=30, dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes - 3, rows)  # the last 3 classes never appear
    labels[labels == 4] = 5  # nor class 4
    labels[: rows // 3] = 7  # a hot class
    rng.shuffle(labels)
    features = (rng.standard_normal((rows, width)) + labels[:, None]).astype(dtype)
    return features, labels


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "feature_chunks, label_chunks",
    [
        ((37, -1), 37),  # many even chunks
        (((5, 700, 1, 94, 400, 300), -1), (600, 900)),  # uneven, and labels chunked differently
        ((100, 4), 250),  # chunked across the columns too
        ((-1, -1), -1),  # one chunk
    ],
)
def test_matches_numpy_on_the_threaded_scheduler(dtype, feature_chunks, label_chunks):
    features, labels = _data(dtype=dtype)
    expected_centers, expected_counts = _reference(features, labels, 30)
    with dask.config.set(scheduler="threads"):
        centers, counts = center_dask.class_centers(
            da.from_array(features, chunks=feature_chunks), da.from_array(labels, chunks=label_chunks), 30, split_every=3
        )
    assert centers.dtype == dtype and counts.dtype == np.int64 and centers.shape == (30, 9)
    np.testing.assert_array_equal(counts, expected_counts)
    tolerance = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(centers, expected_centers, rtol=tolerance, atol=tolerance * 30)
    assert np.all(centers[[4, 27, 28, 29]] == 0) and np.all(counts[[4, 27, 28, 29]] == 0)


def test_lazily_generated_input_of_200_chunks():
    rows, width, num_classes = 40_000, 16, 50
    features = da.random.default_rng(3).standard_normal((rows, width), chunks=(200, width))
    labels = da.arange(rows, chunks=200) % num_classes
    centers, counts = center_dask.class_centers(features, labels, num_classes, split_every=4)
    expected_centers, expected_counts = _reference(features.compute(), labels.compute(), num_classes)
    np.testing.assert_array_equal(counts, expected_counts)
    np.testing.assert_allclose(centers, expected_centers, rtol=1e-12, atol=1e-12)


def test_on_a_local_cluster():
    distributed = pytest.importorskip("distributed")
    features, labels = _data(rows=3000, dtype=np.float32, seed=1)
    expected_centers, expected_counts = _reference(features, labels, 30)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with distributed.Client(cluster) as client:
            with distributed.get_task_stream(client) as tasks:
                centers, counts = center_dask.class_centers(
                    da.from_array(features, chunks=(250, -1)), da.from_array(labels, chunks=250), 30
                )
            assert len(client.scheduler_info()["workers"]) == 2
            # the 12 chunks were reduced by the cluster's workers, not in this process
            chunk_tasks = [task for task in tasks.data if "_chunk_sums" in str(task["key"])]
            assert len(chunk_tasks) == 12
    np.testing.assert_array_equal(counts, expected_counts)
    np.testing.assert_allclose(centers, expected_centers, rtol=1e-6, atol=1e-5)


def test_errors_name_the_problem():
    features, labels = _data()
    bad = labels.copy()
    bad[1234] = 30
    with pytest.raises(IndexError, match="label 30 at position 1234"):
        center_dask.class_centers(da.from_array(features, chunks=(100, -1)), da.from_array(bad, chunks=100), 30)
    with pytest.raises(TypeError, match="integer"):
        center_dask.class_centers(features, labels.astype(np.float64), 30)
    with pytest.raises(TypeError, match="float32 or float64"):
        center_dask.class_centers(features.astype(np.int32), labels, 30)
    with pytest.raises(ValueError, match="labels for features"):
        center_dask.class_centers(features, labels[:-1], 30)
    unknown = da.from_array(labels, chunks=100)
    unknown = unknown[unknown >= 0]  # chunk sizes unknown until computed
    with pytest.raises(ValueError, match="compute_chunk_sizes"):
        center_dask.class_centers(features, unknown, 30)
    with pytest.raises(ValueError, match="num_classes"):
        center_dask.class_centers(features, labels, 0)
    with pytest.raises(ValueError, match="'numba'"):
        center_dask.class_centers(features, labels, 30, backend="numbaa")


def test_numpy_input_and_empty_input():
    features, labels = _data(rows=50)
    centers, counts = center_dask.class_centers(features, labels, 30)
    np.testing.assert_allclose(centers, _reference(features, labels, 30)[0], rtol=1e-13)
    centers, counts = center_dask.class_centers(np.zeros((0, 4)), np.zeros(0, np.int64), 3)
    assert centers.shape == (3, 4) and np.all(centers == 0) and np.all(counts == 0)


def test_memory_stays_bounded_by_the_chunk_not_the_data():
    """51 MB of lazily generated rows reduced with a few MB at peak: chunks are reduced as they
    are made, never all held (NumPy reports its allocations to tracemalloc)."""
    import tracemalloc

    rows, width, num_classes = 400_000, 16, 10
    features = da.random.default_rng(3).standard_normal((rows, width), chunks=(2000, width))  # 256 kB chunks
    labels = da.arange(rows, chunks=2000) % num_classes
    center_dask.class_centers(features[:4000], labels[:4000], num_classes)  # compile outside the measurement
    with dask.config.set(scheduler="synchronous"):
        tracemalloc.start()
        try:
            centers, counts = center_dask.class_centers(features, labels, num_classes)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < rows * width * 8 / 8, f"peak {peak / 1e6:.1f} MB for {rows * width * 8 / 1e6:.0f} MB of data"
    np.testing.assert_array_equal(counts, np.full(num_classes, rows // num_classes))
    assert centers.shape == (num_classes, width) and np.all(np.abs(centers) < 0.05)  # means of N(0, 1) draws
