"""Centers sharded over ranks (a Shard(0) DTensor) on real torch.distributed processes (gloo on
127.0.0.1): the sharded step gives the data-parallel step's centers bit for bit, and one
process's on the whole batch within tolerance; rule pytorch's grad_centers are DDP's average;
errors fail every rank with nothing moved; a checkpoint saved by 4 ranks loads into 2 and into 3
and training goes on to the unbroken run's centers."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import centerkern  # noqa: E402
from centerkern.testing.local_ranks import run_on_local_ranks  # noqa: E402
from conftest import assert_matches  # noqa: E402
from workers.sharded_workers import (  # noqa: E402
    ALPHA, NUM_CLASSES, STEPS_AFTER_SAVE, STEPS_BEFORE_SAVE, WIDTH, global_batch, run_rank, split, starting_centers,
    step_batches,
)

TIME_LIMIT = 240  # seconds for a whole group: process start-up, imports and compiles included


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    """4 ranks (which save the checkpoint), then 2 and 3 (which load it)."""
    checkpoint = tmp_path_factory.mktemp("checkpoint")
    return {
        world_size: run_on_local_ranks(run_rank, world_size, str(checkpoint), time_limit=TIME_LIMIT)
        for world_size in (4, 2, 3)
    }


WORLD_SIZES = pytest.mark.parametrize("world_size", [4, 2, 3])


def _reference(rule, world_size):
    """One process on each step's whole batch (rule pytorch: the centers do not move)."""
    centers, expected = starting_centers(), []
    for seed, _, classes in step_batches(world_size):
        features, labels = global_batch(seed, classes=classes)
        centers = centerkern.center_loss(features, labels, centers, ALPHA, rule=rule, backend="numpy").centers
        expected.append(centers)
    return expected


@WORLD_SIZES
@pytest.mark.parametrize("rule", ["facenet", "wen"])
def test_sharded_centers_equal_the_data_parallel_steps_bit_for_bit(groups, world_size, rule):
    results = groups[world_size]
    expected = _reference(rule, world_size)
    for rank in range(world_size):
        for step, entry in enumerate(results[rank][rule]):
            np.testing.assert_array_equal(entry["centers"], entry["data_parallel_centers"], err_msg=f"rank {rank}, step {step}")
            assert_matches(entry["centers"], expected[step])
            # loss and grad are the rank's own, the same bits as the data-parallel step's
            assert entry["loss"] == entry["data_parallel_loss"]
            np.testing.assert_array_equal(entry["grad"], entry["data_parallel_grad"])
            assert entry["placements"] == ["Shard(dim=0)"]


@WORLD_SIZES
def test_each_rank_holds_its_block_of_rows_only(groups, world_size):
    rows_per_rank = -(-NUM_CLASSES // world_size)
    for rank in range(world_size):
        expected_rows = max(0, min(rows_per_rank, NUM_CLASSES - rank * rows_per_rank))
        assert all(entry["local_rows"] == expected_rows for entry in groups[world_size][rank]["wen"])
        shape, is_float64, total = groups[world_size][rank]["zeros"]
        assert tuple(shape) == (expected_rows, WIDTH) and is_float64 and total == 0.0


@WORLD_SIZES
def test_rule_pytorch_gives_each_owner_ddps_average_of_grad_centers(groups, world_size):
    results = groups[world_size]
    for rank in range(world_size):
        for step, entry in enumerate(results[rank]["pytorch"]):
            assert entry["grad_centers_placements"] == ["Shard(dim=0)"]
            np.testing.assert_allclose(entry["grad_centers"], entry["ddp_average"], rtol=1e-6, atol=1e-7)
            np.testing.assert_array_equal(entry["centers"], starting_centers())  # the optimizer moves them
    # and the average is the reference's, from each rank's batch on its own
    seed, empty_rank, classes = step_batches(world_size)[0]
    local = [
        centerkern.center_loss(*split(global_batch(seed, classes=classes), world_size, rank, empty_rank),
                               starting_centers(), ALPHA, rule="pytorch", backend="numpy").grad_centers
        for rank in range(world_size)
    ]
    np.testing.assert_allclose(results[0]["pytorch"][0]["grad_centers"], np.mean(local, axis=0), rtol=1e-5, atol=1e-6)


@WORLD_SIZES
def test_out_none_and_the_sharded_gather(groups, world_size):
    features, labels = global_batch(7)
    expected = centerkern.center_loss(features, labels, starting_centers(), ALPHA, rule="wen", backend="numpy").centers
    for rank in range(world_size):
        kept, fresh = groups[world_size][rank]["out=None"]
        np.testing.assert_array_equal(kept, starting_centers())
        assert_matches(fresh, expected)
        asked, rows = groups[world_size][rank]["gather"]
        np.testing.assert_array_equal(rows, starting_centers()[asked])


@WORLD_SIZES
def test_a_bad_label_on_one_rank_fails_every_rank_and_moves_nothing(groups, world_size):
    for rank in range(world_size):
        message, unchanged = groups[world_size][rank]["bad label"]
        gather_message = groups[world_size][rank]["bad label in a gather"]
        if rank == 1:
            assert message.startswith("IndexError") and f"label {NUM_CLASSES} at position 1" in message
            assert gather_message.startswith("IndexError")
        else:
            assert message.startswith("PeerInputError") and "[1]" in message
            assert gather_message.startswith("PeerInputError")
        assert unchanged


@WORLD_SIZES
def test_replicated_dtensor_centers_take_the_data_parallel_step(groups, world_size):
    for rank in range(world_size):
        same_object, placements, equal = groups[world_size][rank]["replicated"]
        assert same_object and placements == ["Replicate()"] and equal
        assert groups[world_size][rank]["module over a mesh"]


@WORLD_SIZES
def test_rule_pytorch_on_replicated_dtensors_gives_the_average_as_a_partial(groups, world_size):
    for rank in range(world_size):
        placements, averaged = groups[world_size][rank]["replicated pytorch"]
        assert placements == ["Partial(avg)"] and averaged


@WORLD_SIZES
def test_fewer_classes_than_ranks_can_hold_rows(groups, world_size):
    """K = 5: with 4 ranks the last owns no row; the shards are distribute_tensor's."""
    for rank in range(world_size):
        local_shape, distribute_tensors_shape, equal = groups[world_size][rank]["few classes"]
        assert local_shape == distribute_tensors_shape and equal
    if world_size == 4:
        assert groups[4][3]["few classes"][0] == (0, WIDTH)


def test_normal_centers_are_the_same_on_any_number_of_ranks(groups):
    normal = groups[4][0]["normal"]
    for world_size in (2, 3):
        for rank in range(world_size):
            np.testing.assert_array_equal(groups[world_size][rank]["normal"], normal)
    assert normal.shape == (2500, 2) and len({row.tobytes() for row in normal}) == 2500  # no two rows alike
    assert abs(normal.mean()) < 0.5 and 0.5 < normal.std() < 1.5


@WORLD_SIZES
def test_a_mesh_in_another_order_than_its_group_is_refused(groups, world_size):
    for rank in range(world_size):
        assert groups[world_size][rank]["reordered mesh"].startswith("ValueError")
        assert "rank order" in groups[world_size][rank]["reordered mesh"]


@WORLD_SIZES
def test_ranks_that_disagree_on_alpha_all_refuse(groups, world_size):
    for rank in range(world_size):
        message, unchanged = groups[world_size][rank]["other alpha"]
        assert message.startswith("PeerInputError") and "[1] disagree" in message
        assert unchanged


def test_a_checkpoint_loaded_by_as_many_ranks_goes_on_bit_for_bit(groups):
    for rank in range(4):
        np.testing.assert_array_equal(groups[4][rank]["reloaded"], groups[4][rank]["module"])


@pytest.mark.parametrize("world_size", [2, 3])
def test_a_checkpoint_of_4_ranks_loads_into_another_world_and_training_goes_on(groups, world_size):
    unbroken = groups[4][0]["module"]
    centers = np.zeros((NUM_CLASSES, WIDTH), np.float32)
    for step in range(STEPS_BEFORE_SAVE + STEPS_AFTER_SAVE):
        if step == STEPS_BEFORE_SAVE:
            saved = centers
        features, labels = global_batch(100 + step)
        centers = centerkern.center_loss(features, labels, centers, ALPHA, rule="wen", backend="numpy").centers
    assert_matches(unbroken, centers)
    for rank in range(world_size):
        results = groups[world_size][rank]
        np.testing.assert_array_equal(results["loaded"], groups[2][0]["loaded"])
        assert_matches(results["loaded"], saved)
        assert_matches(results["module"], unbroken)
        assert_matches(results["module"], centers)


@WORLD_SIZES
def test_the_sharded_module_in_evaluation_and_with_rule_pytorch(groups, world_size):
    for rank in range(world_size):
        results = groups[world_size][rank]
        features, labels = split(global_batch(150), world_size, rank)
        expected = centerkern.center_loss(features, labels, results["module"], ALPHA, rule="wen", backend="numpy").loss
        assert results["eval loss"] == pytest.approx(expected, rel=1e-5)
        centers, grad, placements = results["pytorch module"]
        assert placements == ["Shard(dim=0)"]
        local = [
            centerkern.center_loss(*split(global_batch(160), world_size, r), centers, 0.5, rule="pytorch",
                                   backend="numpy").grad_centers
            for r in range(world_size)
        ]
        np.testing.assert_allclose(grad, np.mean(local, axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(results["pytorch module after SGD"], centers - 0.5 * grad, rtol=1e-6, atol=1e-7)


def test_a_module_with_sharded_centers_needs_distributed():
    from centerkern.torch import CenterLoss

    with pytest.raises(ValueError, match="distributed=True"):
        CenterLoss(10, 4, placement="sharded")
    with pytest.raises(ValueError, match="placement"):
        CenterLoss(10, 4, distributed=True, placement="rows")


def test_the_sharded_benchmark_runs_and_reports_its_goals(tmp_path):
    """benchmarks/distributed_sharded.py at toy sizes: every configuration reported, the sharded
    step's centers the sparse step's bit for bit (its own check), the goals stated (timings and
    memory are not asserted)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "distributed_sharded.py"
    out = tmp_path / "sharded.json"
    completed = subprocess.run(
        [sys.executable, str(script), "--ranks", "2", "--classes", "500", "--width", "4", "--batch", "8",
         "--repeats", "1", "--huge-classes", "1000", "--huge-ranks", "2", "--out", str(out)],
        capture_output=True, text=True, timeout=TIME_LIMIT,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(out.read_text())
    assert [(row["ranks"], row["classes"]) for row in report["rows"]] == [(2, 500), (2, 1000)]
    assert report["rows"][0]["sharded_equals_sparse_bitwise"] is True
    assert all(row["sharded_peak_mb_per_rank"] >= 0 and row["memory_goal_mb"] > 0 for row in report["rows"])
    assert isinstance(report["goals"]["all_met"], bool)
