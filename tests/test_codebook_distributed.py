"""centerkern.torch.EMACodebook over real torch.distributed processes (gloo on 127.0.0.1):
every rank ends with the same codebook, bit for bit, equal to one process's on the whole batch,
whichever exchange; the counts it returns are the whole batch's. Bounded: a rank that does not
finish in time is killed and the test fails."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from centerkern.testing.local_ranks import run_on_local_ranks  # noqa: E402
from centerkern.torch import EMACodebook  # noqa: E402
from workers.codebook_workers import (CODEBOOK_SIZE, DIM, SCENARIOS, STEPS, batches, masks_of,  # noqa: E402
                                      run_rank, start_state)


def _one_process(world_size, smoothing, who):
    codebook = EMACodebook(DIM, CODEBOOK_SIZE, smoothing=smoothing)
    codebook.load_state_dict(start_state())
    codebook.train()
    counts = []
    for step in range(STEPS):
        rows, masks = batches(step, world_size)
        whole_mask = np.concatenate([np.ones(len(r), bool) if m is None else m
                                     for r, m in zip(rows, masks_of(masks, world_size, who))])
        output = codebook(torch.from_numpy(np.concatenate(rows)), mask=torch.from_numpy(whole_mask))
        counts.append(output.counts.numpy())
    return {name: value.numpy() for name, value in codebook.state_dict().items()}, counts


@pytest.fixture(scope="module", params=[2, 3], ids=["2 ranks", "3 ranks"])
def ranks(request):
    return request.param, run_on_local_ranks(run_rank, request.param, time_limit=240)


@pytest.mark.parametrize("exchange, smoothing, who", SCENARIOS)
def test_every_rank_ends_with_one_process_codebook(ranks, exchange, smoothing, who):
    world_size, results = ranks
    first_state, first_counts = results[0][exchange, smoothing, who]
    for rank in range(1, world_size):
        state, counts = results[rank][exchange, smoothing, who]
        for name in first_state:
            np.testing.assert_array_equal(state[name], first_state[name], err_msg=f"rank {rank} {name}")
    expected_state, expected_counts = _one_process(world_size, smoothing, who)
    for name, value in expected_state.items():
        if exchange == "sparse":  # the same rows summed in the same order: the same bits
            np.testing.assert_array_equal(first_state[name], value, err_msg=name)
        else:  # per-rank float64 sums added, then rounded
            np.testing.assert_allclose(first_state[name], value, rtol=1e-6, atol=1e-6, err_msg=name)
    for got, expected in zip(first_counts, expected_counts):
        np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(first_state["embed"], start_state()["embed"].numpy())


@pytest.mark.parametrize("exchange", ["sparse", "dense"])
def test_a_bad_mask_on_one_rank_fails_every_rank_and_moves_nothing(ranks, exchange):
    world_size, results = ranks
    start = start_state()["embed"].numpy()
    for rank in range(world_size):
        outcome, embed = results[rank]["bad mask", exchange]
        if rank == world_size - 1:
            assert outcome.startswith("TypeError: mask must be a bool tensor"), outcome
        else:
            assert outcome.startswith(f"PeerInputError: the input of rank(s) [{world_size - 1}]"), outcome
        np.testing.assert_array_equal(embed, start)
