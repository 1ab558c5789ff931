"""centerkern.jax.center_loss under JAX's data parallelism, on 2 and 4 host devices: inside
``shard_map`` (typed as JAX types its own ops) and ``pmap``, ``axis_name=`` moves the centers as
one process on the whole batch would, identically on every shard; a bad label on one shard
fails every shard, and nothing hangs. The devices are made in a process of their own
(``tests/workers/jax_shard_workers.py``); the references are the numpy backend on the whole batch."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("jax")

import centerkern  # noqa: E402
from conftest import assert_matches  # noqa: E402
from workers.jax_shard_workers import ALPHA, STEPS, batches  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module", params=[2, 4], ids=["2 devices", "4 devices"])
def run(request, tmp_path_factory):
    devices = request.param
    out = tmp_path_factory.mktemp("shards") / "results.npz"
    completed = subprocess.run([sys.executable, os.path.join(HERE, "workers", "jax_shard_workers.py"), str(devices), str(out)],
                               capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return devices, dict(np.load(out))


def _reference_steps(rule, devices):
    features, labels, centers = batches(devices)
    steps = []
    for s in range(STEPS):
        steps.append(centerkern.center_loss(features[s], labels[s], centers, ALPHA, rule=rule, backend="numpy"))
        centers = steps[-1].centers
    return features, labels, steps


@pytest.mark.parametrize("exchange", ["auto", "sparse"])
@pytest.mark.parametrize("rule", ["facenet", "wen"])
def test_shard_map_moves_the_centers_by_the_whole_batch_identically_on_every_shard(run, rule, exchange):
    """Either exchange (``auto`` picks dense here, where R·B >= K) gives every shard the same bits,
    the whole batch's update."""
    devices, results = run
    features, _, steps = _reference_steps(rule, devices)
    scenario = rule if exchange == "auto" else f"{rule}.{exchange}"
    copies = results[f"shard_map.{scenario}.copies"]
    assert copies.shape[1] == devices
    for s, expected in enumerate(steps):
        for shard in range(1, devices):
            np.testing.assert_array_equal(copies[s, shard], copies[s, 0])  # the same bits everywhere
        assert_matches(copies[s, 0], expected.centers, features[s], expected.centers)
        # the mean of equal shards' losses is the whole batch's loss, and its gradient the whole batch's
        assert float(results[f"shard_map.{scenario}.loss"][s]) == pytest.approx(expected.loss, rel=1e-5)
        assert_matches(results[f"shard_map.{scenario}.grad_features"][s], expected.grad, features[s])


def test_rule_pytorch_leaves_the_centers_and_sums_their_gradient_over_the_shards(run):
    devices, results = run
    features, _, steps = _reference_steps("pytorch", devices)
    start = batches(devices)[2]
    for s, expected in enumerate(steps):
        for shard in range(devices):
            np.testing.assert_array_equal(results["shard_map.pytorch.copies"][s, shard], start)
        assert_matches(results["shard_map.pytorch.grad_centers"][s], expected.grad_centers, features[s], start)
        assert_matches(results["shard_map.pytorch.grad_features"][s], expected.grad, features[s], start)


@pytest.mark.parametrize("rule", ["facenet", "wen", "pytorch"])
def test_pmap_gives_every_device_the_whole_batch_update(run, rule):
    devices, results = run
    features, _, steps = _reference_steps(rule, devices)
    copies = results[f"pmap.{rule}.copies"]
    assert copies.shape[0] == devices
    for device in range(1, devices):
        np.testing.assert_array_equal(copies[device], copies[0])
    assert_matches(copies[0], steps[0].centers, features[0], steps[0].centers)


def test_without_axis_name_each_shard_moves_its_own_and_cannot_return_it_as_replicated(run):
    devices, results = run
    features, labels, centers = batches(devices)
    per_shard = results["per_shard.loss_and_centers"]
    for shard, (f, y) in enumerate(zip(np.split(features[0], devices), np.split(labels[0], devices))):
        expected = centerkern.center_loss(f, y, centers, ALPHA, rule="wen", backend="numpy")
        assert_matches(per_shard[shard], expected.centers, f, centers)
    for name in ("loss_as_replicated", "centers_as_replicated"):  # as jax.numpy's per-shard values are
        assert "per_shard." + name not in results
        assert re.search(r"out_specs .*replication", str(results[f"per_shard.{name}.error"]), re.S)
    # the gradient works under the default check_vma=True, and equals the whole batch's
    whole = centerkern.center_loss(features[0], labels[0], centers, ALPHA, rule="wen", backend="numpy")
    assert_matches(results["per_shard.grad"], whole.grad, features[0], centers)


@pytest.mark.parametrize("update", ["global", "per_shard", "pmap.global"])
def test_a_bad_label_on_one_shard_fails_every_shard_without_hanging(run, update):
    devices, results = run
    assert f"bad_label.{update}" not in results
    error = str(results[f"bad_label.{update}.error"])
    last = devices - 1  # the worker puts label K + 4 second to last in the batch: on the last shard
    position = 24 // devices - 2
    # whichever shard's error JAX surfaces, it names the holder's finding
    assert (f"label 11 at position {position} is out of range: labels must lie in [0, 7) for 7 classes (in the "
            f"batch of shard {last} over mesh axes ('batch',); bad labels in all: 1; no centers moved anywhere)") \
        in error, error


@pytest.mark.parametrize("exchange", ["sparse", "dense"])
def test_an_alpha_that_is_not_finite_fails_every_shard_in_the_validations_words(run, exchange):
    _, results = run
    assert f"nan_alpha.{exchange}" not in results
    assert "alpha must be finite, got nan" in str(results[f"nan_alpha.{exchange}.error"])


def test_under_pmap_without_axis_name_the_shard_holding_a_bad_label_fails_alone(run):
    """Without ``axis_name`` pmap gives no shard a collective to wait in: the holder's step fails
    with SPEC's message, as on one device."""
    devices, results = run
    assert "bad_label.pmap.per_shard" not in results
    error = str(results["bad_label.pmap.per_shard.error"])
    position = 24 // devices - 2
    assert f"OUT_OF_RANGE: label 11 at position {position} is out of range: labels must lie in [0, 7) for 7 classes" \
        in error, error


def test_on_the_cpu_no_step_goes_through_pure_callback():
    """``jax.pure_callback`` puts its operands on CPU device 0 and waits for them; with several
    host devices, device 0 may be waiting in a collective for the device whose callback waits (a
    step that never finished, seen in this package's benchmark). Where the custom call serves,
    every host call of a step, data-parallel or not, is an FFI call on the device's own buffers."""
    import jax
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    import centerkern.jax as center_jax

    assert center_jax.ffi_path_available()
    features, labels, centers = batches(2)
    mesh = Mesh(np.array(jax.devices()[:1]), ("batch",))
    for rule in ("facenet", "wen", "pytorch"):
        for axis_name in ("batch", None):
            def step(f, y, c, rule=rule, axis_name=axis_name):
                (loss, new), grad = jax.value_and_grad(lambda f: center_jax.center_loss(
                    f, y, c, ALPHA, rule=rule, axis_name=axis_name), has_aux=True)(f)
                return jax.lax.pmean(loss, "batch"), grad, new[None]
            sharded = jax.shard_map(step, mesh=mesh, in_specs=(P("batch"), P("batch"), P()),
                                    out_specs=(P(), P("batch"), P("batch")))
            program = str(jax.make_jaxpr(sharded)(features[0], labels[0], centers))
            assert "ffi_call" in program and "pure_callback" not in program, (rule, axis_name)
