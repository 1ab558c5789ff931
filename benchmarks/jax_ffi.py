"""The JAX step through the XLA FFI custom call, against what a JAX user would otherwise run.

At the sizes S, M and L of ``python -m centerkern bench`` (float32, rule ``wen``), one jitted
training step (``value_and_grad`` of the loss, and the new centers) is timed, in one process,
interleaved, medians (``centerkern._cli.alternatives.interleaved_medians``):

* ``centerkern.jax.center_loss`` through the FFI custom call, the centers donated or not;
* the same rule in ``jax.numpy`` (``.at[].add``), donated or not;
* ``centerkern.jax.center_loss`` through the ``pure_callback`` fallback (older jaxlib);
* the plain ``centerkern.center_loss`` on NumPy arrays (``out=centers``), the kernels' own cost;

and, for the fixed cost of a call, an empty FFI custom call against an empty ``pure_callback``.
Every step is first checked against the ``numpy`` reference. The report ends with ``goals``, on
the step a training loop runs (the centers donated): at least 2x faster than ``jax.numpy`` at M,
and within 1.3x of the plain call on NumPy arrays at M and L. On the CPU the step's custom call
is machine code (``centerkern._adapters.xla_native``): no Python runs per step.

    python benchmarks/jax_ffi.py [--repeats 40] [--out results.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import jax
import jax.numpy as jnp

import centerkern
import centerkern.jax as center_jax
from centerkern._adapters import xla_ffi as _xla_ffi
from centerkern._cli.reports import provenance, write_report
from centerkern._cli.alternatives import interleaved_medians

ALPHA = 0.5
SIZES = {"S": (256, 128, 1000), "M": (1024, 512, 10_000), "L": (8192, 512, 100_000)}


def _inputs(batch, width, classes):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((batch, width)).astype(np.float32), rng.integers(0, classes, batch),
            rng.standard_normal((classes, width)).astype(np.float32))


def _ours(features, labels, centers):
    (loss, new), grad = jax.value_and_grad(
        lambda f: center_jax.center_loss(f, labels, centers, ALPHA, rule="wen"), has_aux=True)(features)
    return loss, grad, new


def _native(features, labels, centers):
    batch = features.shape[0]
    loss, grad = jax.value_and_grad(lambda f: jnp.sum((f - centers[labels]) ** 2) / (2 * batch))(features)
    difference = features - centers[labels]
    counts = jnp.bincount(labels, length=centers.shape[0])
    return loss, grad, centers.at[labels].add(ALPHA * difference / (1 + counts[labels])[:, None])


def _jitted(step, features, labels, start, donate, ffi=True):
    """A runner for ``step`` under jit. With ``donate`` the centers are donated and the output
    centers fed back, as a training loop does; the trace is made on the chosen path."""
    jitted = jax.jit(step, donate_argnums=(2,) if donate else ())
    state = {"centers": jnp.asarray(start)}
    arguments = (jnp.asarray(features), jnp.asarray(labels))
    available = center_jax._ffi_state.get("available")
    center_jax._ffi_state["available"] = ffi
    try:
        jax.block_until_ready(jitted(*arguments, jnp.asarray(start)))  # traced and compiled here
    finally:
        center_jax._ffi_state["available"] = available

    def run():
        loss, grad, new = jitted(*arguments, state["centers"] if donate else state["centers"])
        jax.block_until_ready(new)
        if donate:
            state["centers"] = new
        return loss, grad, new
    return run


def _plain(features, labels, start):
    centers = start.copy()
    return lambda: centerkern.center_loss(features, labels, centers, ALPHA, rule="wen", out=centers)


def _empty_calls():
    """An FFI custom call and a pure_callback that do nothing, jitted: the fixed cost of each."""
    target = _xla_ffi.handler(lambda frame, arguments, results: None)
    jax.ffi.register_ffi_target("centerkern_benchmark_empty", jax.ffi.pycapsule(target), platform="cpu")
    shape = jax.ShapeDtypeStruct((), jnp.float32)
    ffi = jax.jit(lambda x: jax.ffi.ffi_call("centerkern_benchmark_empty", shape)(x))
    callback = jax.jit(lambda x: jax.pure_callback(lambda x: np.zeros((), np.float32), shape, x))
    x = jnp.zeros((), jnp.float32)
    return target, {"empty FFI custom call": lambda: jax.block_until_ready(ffi(x)),
                    "empty pure_callback": lambda: jax.block_until_ready(callback(x))}


def _check(features, labels, start):
    expected = centerkern.center_loss(features, labels, start, ALPHA, rule="wen", backend="numpy")
    for name, ffi in (("FFI", True), ("pure_callback", False)):
        loss, grad, new = _jitted(_ours, features, labels, start, donate=False, ffi=ffi)()
        assert abs(float(loss) - expected.loss) <= 1e-5 * expected.loss, name
        np.testing.assert_allclose(np.asarray(grad), expected.grad, rtol=1e-4, atol=1e-7, err_msg=name)
        np.testing.assert_allclose(np.asarray(new), expected.centers, rtol=1e-4, atol=1e-6, err_msg=name)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--sizes", default="S,M,L")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    report = {"what": "jitted JAX wen step (value_and_grad + new centers), median ms", **provenance(),
              "path": center_jax.step_path(), "sizes": {}, "goals": {}}
    target, empty = _empty_calls()
    report["fixed cost, median us"] = {name: 1e6 * s for name, s in interleaved_medians(empty, 10 * args.repeats).items()}
    del target
    for size in args.sizes.split(","):
        batch, width, classes = SIZES[size]
        features, labels, start = _inputs(batch, width, classes)
        _check(features, labels, start)
        runs = {
            "centerkern.jax FFI": _jitted(_ours, features, labels, start, donate=False),
            "centerkern.jax FFI, centers donated": _jitted(_ours, features, labels, start, donate=True),
            "jax.numpy .at[].add": _jitted(_native, features, labels, start, donate=False),
            "jax.numpy .at[].add, centers donated": _jitted(_native, features, labels, start, donate=True),
            "centerkern.jax pure_callback": _jitted(_ours, features, labels, start, donate=False, ffi=False),
            "centerkern.center_loss on NumPy": _plain(features, labels, start),
        }
        medians = {name: 1e3 * s for name, s in interleaved_medians(runs, args.repeats).items()}
        report["sizes"][size] = {"B": batch, "D": width, "K": classes, "median_ms": medians}
        print(f"{size}: B={batch} D={width} K={classes}")
        for name, ms in medians.items():
            print(f"  {name:40s} {ms:9.3f} ms")
        if size in ("M", "L"):
            # the goals are on the step a training loop runs: the centers donated (without, both
            # sides copy the K x D centers every step, which the ratio below shows too)
            donated = medians["centerkern.jax FFI, centers donated"]
            if size == "M":
                speedup = medians["jax.numpy .at[].add, centers donated"] / donated
                report["goals"][f"{size}: donated FFI step vs jax.numpy, donated"] = {
                    "value": speedup, "target": ">= 2.0", "met": speedup >= 2.0}
            ratio = donated / medians["centerkern.center_loss on NumPy"]
            report["goals"][f"{size}: donated FFI step / plain call on NumPy"] = {
                "value": ratio, "target": "<= 1.3", "met": ratio <= 1.3}
            report["not goals"] = report.get("not goals", {})
            report["not goals"][f"{size}: FFI step vs jax.numpy, neither donated"] = (
                medians["jax.numpy .at[].add"] / medians["centerkern.jax FFI"])
    print("goals:")
    for name, goal in report["goals"].items():
        print(f"  {name:45s} {goal['value']:6.2f} (target {goal['target']}): {'met' if goal['met'] else 'MISSED'}")
    write_report(report, args.out or Path(__file__).parent / "results" / f"jax-ffi-{report['date'][:10]}.json")


if __name__ == "__main__":
    main()
