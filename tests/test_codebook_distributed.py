"""centerkern.torch.EMACodebook over real torch.distributed processes (gloo on 127.0.0.1):
every rank ends with the same codebook, bit for bit, equal to one process's on the whole batch,
whichever exchange; the counts it returns are the whole batch's. Bounded: a rank that does not
finish in time is killed and the test fails."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from centerkern.testing.local_ranks import run_on_local_ranks  # noqa: E402
from centerkern.torch import EMACodebook  # noqa: E402
from workers.codebook_workers import (CODEBOOK_SIZE, DIM, EXCHANGES, STEPS, batches, run_rank,  # noqa: E402
                                      start_state)


def _one_process(world_size, smoothing):
    codebook = EMACodebook(DIM, CODEBOOK_SIZE, smoothing=smoothing)
    codebook.load_state_dict(start_state())
    codebook.train()
    counts = []
    for step in range(STEPS):
        rows, masks = batches(step, world_size)
        output = codebook(torch.from_numpy(np.concatenate(rows)), mask=torch.from_numpy(np.concatenate(masks)))
        counts.append(output.counts.numpy())
    return {name: value.numpy() for name, value in codebook.state_dict().items()}, counts


@pytest.mark.parametrize("world_size", [2, 3])
def test_every_rank_ends_with_one_process_codebook(world_size):
    results = run_on_local_ranks(run_rank, world_size, time_limit=240)
    for exchange in EXCHANGES:
        for smoothing in ("current_code", "laplace"):
            first_state, first_counts = results[0][exchange, smoothing]
            for rank in range(1, world_size):
                state, counts = results[rank][exchange, smoothing]
                for name in first_state:
                    np.testing.assert_array_equal(state[name], first_state[name], err_msg=f"rank {rank} {name}")
            expected_state, expected_counts = _one_process(world_size, smoothing)
            for name, value in expected_state.items():
                # sparse: the same rows summed in the same order; dense: per-rank float64 sums added
                np.testing.assert_allclose(first_state[name], value, rtol=1e-6, atol=1e-6,
                                           err_msg=f"{exchange} {smoothing} {name}")
            for got, expected in zip(first_counts, expected_counts):
                np.testing.assert_array_equal(got, expected)
            assert not np.array_equal(first_state["embed"], start_state()["embed"].numpy())
