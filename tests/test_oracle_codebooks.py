"""centerkern.testing.check_codebook_update: the oracle passes EMA codebook updates made right (the
reference, the numba kernels, torch written as EnCodec and vector-quantize-pytorch write it), on
one rank and on several, and names each known mistake of the family, and no other."""

from functools import partial

import numpy as np
import pytest

from centerkern.codebooks import SMOOTHINGS, class_sums, ema_apply, ema_update
from centerkern.testing import CODEBOOK_MISTAKES, CodebookMismatch, check_codebook_update
from centerkern.testing._codebooks import codebook_cases

DECAY, EPS = 0.99, 1e-5


def _centerkern_step(backend, smoothing):
    def step(features, codes, cluster_size, embed_avg, embed, all_reduce=None):
        if all_reduce is None:
            ema_update(features, codes, cluster_size, embed_avg, embed, decay=DECAY, eps=EPS, smoothing=smoothing,
                       backend=backend)
        else:  # the data-parallel form: sums on each rank, added over the ranks, then the EMA
            counts, sums = class_sums(features, codes, embed.shape[0], backend=backend)
            ema_apply(all_reduce(counts), all_reduce(sums), cluster_size, embed_avg, embed, decay=DECAY, eps=EPS,
                      smoothing=smoothing, backend=backend)
        return cluster_size, embed_avg, embed
    return step


@pytest.mark.parametrize("shards", [1, 2, 3])
@pytest.mark.parametrize("smoothing", SMOOTHINGS)
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_the_reference_and_the_numba_kernels_agree(backend, smoothing, shards):
    check_codebook_update(_centerkern_step(backend, smoothing), decay=DECAY, eps=EPS, smoothing=smoothing,
                          shards=shards)


def _published_torch_step(decay=DECAY, eps=EPS):
    """The update as EnCodec's EuclideanCodebook and vector-quantize-pytorch write it: one-hot
    counts and an einsum for the sums, ema_inplace, Laplace's smoothing scaled by the total, and
    under data parallelism an in-place all_reduce of both before the EMA."""
    import torch
    import torch.nn.functional as F
    from torch import einsum

    def ema_inplace(moving_avg, new, decay):
        moving_avg.data.mul_(decay).add_(new, alpha=(1 - decay))

    def laplace_smoothing(x, n_categories, epsilon=1e-5):
        return (x + epsilon) / (x.sum() + n_categories * epsilon)

    def step(flatten, embed_ind, cluster_size, embed_avg, embed, all_reduce=None):
        codebook_size = embed.shape[0]
        embed_onehot = F.one_hot(embed_ind, codebook_size).type(flatten.dtype)
        bins = embed_onehot.sum(0)
        embed_sum = einsum("n d, n c -> c d", flatten, embed_onehot)
        if all_reduce is not None:
            all_reduce(bins)
            all_reduce(embed_sum)
        ema_inplace(cluster_size, bins, decay)
        ema_inplace(embed_avg, embed_sum, decay)
        smoothed = laplace_smoothing(cluster_size, codebook_size, eps) * cluster_size.sum()
        embed_normalized = embed_avg / smoothed.unsqueeze(1)
        embed.data.copy_(embed_normalized)
        return cluster_size, embed_avg, embed
    return step


@pytest.mark.parametrize("shards", [1, 2])
def test_a_torch_step_written_as_the_published_code_agrees(shards):
    pytest.importorskip("torch")
    check_codebook_update(_published_torch_step(), decay=DECAY, eps=EPS, smoothing="laplace", framework="torch",
                          shards=shards)


def _mistakes():
    """Every variant of every mistake, on one rank and on two (the mistakes of data parallelism
    on two only: on one rank they would be the update made right)."""
    return [pytest.param(mistake, variant, shards, id=f"{number}-{v}-{shards}-ranks")
            for number, mistake in enumerate(CODEBOOK_MISTAKES) for v, variant in enumerate(mistake.variants)
            for shards in ((2,) if mistake.sharded_only else (1, 2))]


@pytest.mark.parametrize("smoothing", SMOOTHINGS)
@pytest.mark.parametrize("mistake, variant, shards", _mistakes())
def test_each_mistake_is_named_and_no_other(mistake, variant, shards, smoothing):
    with pytest.raises(CodebookMismatch) as failure:
        check_codebook_update(partial(variant, decay=DECAY, eps=EPS, smoothing=smoothing), decay=DECAY, eps=EPS,
                              smoothing=smoothing, shards=shards)
    message, diagnosis = str(failure.value), failure.value.diagnosis
    assert diagnosis.named == [mistake], message
    assert message.splitlines()[-1] == f"diagnosis: {mistake.explanation}", message
    assert not [other for other in CODEBOOK_MISTAKES if other is not mistake and other.explanation in message], message


def _numpy_step(scatter=None, reduce_counts=True, smoothed=True, empty_skipped=False):
    """A NumPy step written by hand, right but for what is asked."""
    def step(features, codes, cluster_size, embed_avg, embed, all_reduce=None):
        if empty_skipped and codes.size == 0:
            return cluster_size, embed_avg, embed  # the decay of an empty batch left out
        counts = np.bincount(codes, minlength=embed.shape[0]).astype(features.dtype)
        sums = np.zeros_like(embed)
        if scatter:
            sums[codes] = features
        else:
            np.add.at(sums, codes, features)
        if all_reduce is not None:
            counts = all_reduce(counts) if reduce_counts else counts
            sums = all_reduce(sums)
        cluster_size *= DECAY
        cluster_size += (1 - DECAY) * counts
        embed_avg *= DECAY
        embed_avg += (1 - DECAY) * sums
        total = cluster_size.sum()
        size = (cluster_size + EPS) / (total + embed.shape[0] * EPS) * total if smoothed else cluster_size
        with np.errstate(divide="ignore", invalid="ignore"):
            embed[...] = embed_avg / size[:, None]
        return cluster_size, embed_avg, embed
    return step


@pytest.mark.parametrize("step, shards, named", [
    (_numpy_step(), 1, None),
    (_numpy_step(), 4, None),
    (_numpy_step(scatter=True), 1, "duplicate codes are not accumulated"),
    (_numpy_step(scatter=True), 2, "duplicate codes are not accumulated"),
    (_numpy_step(smoothed=False), 1, "the smoothing is left out"),
    (_numpy_step(reduce_counts=False), 2, "the batch's per-code counts are not all-reduced across ranks"),
], ids=["right", "right on 4 ranks", "scatter", "scatter on 2 ranks", "unsmoothed", "counts not reduced"])
def test_hand_written_steps(step, shards, named):
    if named is None:
        check_codebook_update(step, decay=DECAY, eps=EPS, shards=shards)
        return
    with pytest.raises(CodebookMismatch) as failure:
        check_codebook_update(step, decay=DECAY, eps=EPS, shards=shards)
    assert failure.value.diagnosis.verdict.startswith(f"diagnosis: {named}"), str(failure.value)


def test_a_torch_step_that_leaves_the_counts_to_each_rank_is_named():
    pytest.importorskip("torch")
    published = _published_torch_step()

    def step(features, codes, cluster_size, embed_avg, embed, all_reduce):
        return published(features, codes, cluster_size, embed_avg, embed, all_reduce=lambda array: array)

    with pytest.raises(CodebookMismatch) as failure:
        check_codebook_update(step, decay=DECAY, eps=EPS, framework="torch", shards=2)
    assert failure.value.diagnosis.named == [CODEBOOK_MISTAKES[3]], str(failure.value)


def test_agrees_only_where_every_call_agrees():
    """A step wrong on one call alone (the empty batch, whose decay it skips) is not passed, says
    where it differs, and names no mistake it did not make."""
    with pytest.raises(CodebookMismatch) as failure:
        check_codebook_update(_numpy_step(empty_skipped=True), decay=DECAY, eps=EPS)
    message, diagnosis = str(failure.value), failure.value.diagnosis
    assert not diagnosis.named and "no known mistake" in diagnosis.verdict, message
    for finding in diagnosis.findings:
        assert not finding.agrees and len(finding.differs_on) == 2, message  # the empty batch, in each dtype
        assert all("step 3 of 3" in label for label in finding.differs_on)
        assert f"{finding.quantity}: agrees" not in message


def test_the_cases_hold_what_the_mistakes_need():
    cases = codebook_cases(np.float32)
    batches = [codes for case in cases for _, codes in case.batches]
    assert any(codes.size == 0 for codes in batches)  # an empty batch
    assert any(np.bincount(codes).max(initial=0) >= 7 for codes in batches)  # heavy duplicates
    assert any(case.embed.shape[0] == 1 for case in cases)  # one code only
    assert any(codes.size == 1 for codes in batches)  # a batch of one row
    dead = [(codes, case) for case in cases for _, codes in case.batches if case.embed.shape[0] > 1]
    assert all(np.unique(codes).size < case.embed.shape[0] for codes, case in dead)  # dead codes in each
    assert any(not case.cluster_size.any() for case in cases)  # a fresh codebook
    assert all(len(case.batches) >= 2 for case in cases)  # several steps


def test_a_coarser_dtype_is_a_form_problem():
    def step(features, codes, cluster_size, embed_avg, embed):
        cluster_size, embed_avg, embed = (a.astype(np.float32) for a in (cluster_size, embed_avg, embed))
        ema_update(features.astype(np.float32), codes, cluster_size, embed_avg, embed, decay=DECAY, eps=EPS)
        return cluster_size, embed_avg, embed

    with pytest.raises(CodebookMismatch) as failure:
        check_codebook_update(step, decay=DECAY, eps=EPS)
    assert "embed comes back as float32 for float64 inputs" in str(failure.value)
    assert failure.value.diagnosis.verdict.startswith("diagnosis: the outputs do not have the form asked for")
    check_codebook_update(step, decay=DECAY, eps=EPS, dtypes=(np.float32,))


def test_ranks_that_do_not_reduce_alike_are_told_so():
    def step(features, codes, cluster_size, embed_avg, embed, all_reduce):
        if codes.size:  # a rank with an empty shard skips the collective: the others would hang
            all_reduce(np.zeros(1))
        return cluster_size, embed_avg, embed

    with pytest.raises(AssertionError, match="all_reduce is a collective"):
        check_codebook_update(step, shards=2)


@pytest.mark.parametrize("arguments, error", [
    ({"decay": 1.5}, ValueError), ({"eps": -1.0}, ValueError), ({"smoothing": "none"}, ValueError),
    ({"shards": 0}, ValueError), ({"framework": "mxnet"}, ValueError), ({"dtypes": (np.float16,)}, ValueError),
    ({"dtypes": ()}, ValueError),
])
def test_bad_settings_are_refused_before_any_call(arguments, error):
    def step(*arguments, **keywords):
        raise AssertionError("called")

    with pytest.raises(error):
        check_codebook_update(step, **arguments)


def test_a_step_must_return_the_three_arrays():
    with pytest.raises(AssertionError, match=r"must return \(cluster_size, embed_avg, embed\)"):
        check_codebook_update(lambda features, codes, cluster_size, embed_avg, embed: embed)
