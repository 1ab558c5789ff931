"""centerkern.distributed over real torch.distributed processes (gloo on 127.0.0.1): every rank
ends with the centers one process computes on the whole batch, bit for bit the same on every
rank. Bounded: a rank that does not finish in time is killed and the test fails."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import centerkern  # noqa: E402
from centerkern.testing.local_ranks import run_on_local_ranks  # noqa: E402
from conftest import assert_matches  # noqa: E402
from workers.distributed_workers import NUM_CLASSES, SCENARIOS, WIDTH, global_batches, run_rank  # noqa: E402

TIME_LIMIT = 240  # seconds for a whole group: process start-up, imports and compiles included


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def group(request):
    return request.param, run_on_local_ranks(run_rank, request.param, time_limit=TIME_LIMIT)


def _one_process(rule, scenario, steps, world_size, hot):
    centers, losses = None, []
    for step in range(steps):
        features, labels, start = global_batches(100 * scenario + step, world_size, hot)
        centers = start if centers is None else centers
        per_rank = [
            centerkern.center_loss(f, l, centers, 0.6, rule=rule, backend="numpy") for f, l in zip(features, labels)
        ]
        whole = centerkern.center_loss(np.concatenate(features), np.concatenate(labels), centers, 0.6, rule=rule, backend="numpy")
        losses.append([(r.loss, r.grad) for r in per_rank])
        centers = whole.centers
    return centers, losses


def test_every_rank_ends_with_the_centers_of_one_process_on_the_whole_batch(group):
    world_size, results = group
    for number, (rule, exchange, hot, steps) in enumerate(SCENARIOS):
        expected_centers, expected_losses = _one_process(rule, number, steps, world_size, hot)
        for rank in range(world_size):
            centers, losses = results[rank][number]
            assert_matches(centers, expected_centers)
            for step in range(steps):  # loss and grad are the rank's own
                loss, grad = losses[step]
                assert loss == pytest.approx(expected_losses[step][rank][0], rel=1e-6, abs=1e-12)
                assert_matches(grad, expected_losses[step][rank][1])
            # replicas are bitwise identical, not merely close
            np.testing.assert_array_equal(centers, results[0][number][0], err_msg=f"{rule}/{exchange}: rank {rank}")


def test_out_none_and_the_torch_module(group):
    world_size, results = group
    features, labels, start = global_batches(7, world_size, False)
    expected = centerkern.center_loss(np.concatenate(features), np.concatenate(labels), start, 0.6, rule="wen", backend="numpy")
    module_centers = np.zeros((NUM_CLASSES, WIDTH), np.float32)
    for step in range(3):
        before = module_centers
        features_m, labels_m, _ = global_batches(200 + step, world_size, True)
        module_centers = centerkern.center_loss(
            np.concatenate(features_m), np.concatenate(labels_m), module_centers, 0.6, rule="wen", backend="numpy"
        ).centers
    for rank in range(world_size):
        kept, fresh = results[rank]["out=None"]
        np.testing.assert_array_equal(kept, start)
        assert_matches(fresh, expected.centers)
        centers, grad = results[rank]["module"]
        assert_matches(centers, module_centers)
        np.testing.assert_array_equal(centers, results[0]["module"][0])
        # the last step's gradient: this rank's batch against the centers before that step
        local = centerkern.center_loss(features_m[rank], labels_m[rank], before, 0.6, rule="wen", backend="numpy")
        assert_matches(grad, local.grad)


def test_a_bad_input_on_one_rank_fails_every_rank_without_hanging(group):
    world_size, results = group
    for rank in range(world_size):
        message, centers_unchanged = results[rank]["bad label"]
        if rank == 1:
            assert message.startswith("IndexError") and f"label {NUM_CLASSES} at position 1" in message
        else:
            assert message.startswith("PeerInputError") and "[1]" in message
        assert centers_unchanged


def test_ranks_that_disagree_on_alpha_all_refuse(group):
    world_size, results = group
    for rank in range(world_size):
        message, centers_unchanged = results[rank]["other alpha"]
        assert message.startswith("PeerInputError") and "[1] disagree" in message
        assert centers_unchanged
        message, centers_unchanged = results[rank]["huge alpha"]
        if rank == 1:
            assert message.startswith("ValueError") and "finite" in message
        else:
            assert message.startswith("PeerInputError") and "[1]" in message
        assert centers_unchanged


def test_outside_a_process_group_it_says_so():
    import centerkern.distributed as center_distributed

    features, labels, centers = global_batches(0, 1, False)
    with pytest.raises(RuntimeError, match="process group"):
        center_distributed.center_loss(torch.from_numpy(features[0]), torch.from_numpy(labels[0]), torch.from_numpy(centers), 0.5)


def test_auto_exchange_follows_the_measured_crossover():
    """sparse while ranks x touched classes < K (the crossover of benchmarks/distributed_exchange.py)."""
    from centerkern.distributed import SPARSE_BELOW_FRACTION, choose_exchange

    assert SPARSE_BELOW_FRACTION == 1.0
    assert choose_exchange("auto", 2, 16, 20_000) == "sparse"  # R*U/K = 0.0016: 6x cheaper measured
    assert choose_exchange("auto", 4, 4096, 20_000) == "sparse"  # 0.82: 66 against 79 ms
    assert choose_exchange("auto", 3, 8192, 20_000) == "dense"  # 1.23: 66 against 76 ms
    assert choose_exchange("auto", 2, 16_384, 20_000) == "dense"  # 1.64: 93 against 149 ms
    assert choose_exchange("auto", 2, 4999, 10_000) == "sparse" and choose_exchange("auto", 2, 5000, 10_000) == "dense"
    assert choose_exchange("sparse", 4, 10**6, 10) == "sparse" and choose_exchange("dense", 2, 1, 10**6) == "dense"
    with pytest.raises(ValueError, match="unknown exchange 'ring'"):
        choose_exchange("ring", 2, 1, 10)


def test_the_exchange_benchmark_runs_and_both_exchanges_agree(tmp_path):
    """The benchmark at toy sizes: it runs, reports every configuration, and checks that the
    sparse and dense exchanges gave the same centers (its timings are not asserted)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "distributed_exchange.py"
    out = tmp_path / "exchange.json"
    completed = subprocess.run(
        [sys.executable, str(script), "--ranks", "2", "--classes", "64", "--width", "4", "--touched", "4", "32",
         "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=TIME_LIMIT,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(out.read_text())
    assert [(row["ranks"], row["touched_per_rank"]) for row in report["rows"]] == [(2, 4), (2, 32)]
    assert all(row["agree"] for row in report["rows"])  # the script's own sparse-vs-dense check
    assert set(report["crossover_load"]) == {"2"}
