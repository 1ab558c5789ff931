"""The codebook updates against the published code they replace, run as published:
vector-quantize-pytorch's ``Codebook`` (EMA update, ``kmeans_init=False``), EnCodec's
``EuclideanCodebook`` and scikit-learn's ``MiniBatchKMeans.partial_fit``. After several steps
the state is equal to float32 tolerance and the codes equal, except where two codes lie at
distances equal to within rounding (checked from the exact distances, not assumed)."""

import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")
vector_quantize = pytest.importorskip("vector_quantize_pytorch.vector_quantize_pytorch")

from centerkern import codebooks  # noqa: E402
from centerkern.torch import EMACodebook  # noqa: E402

STEPS = 5
FLOAT32_TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def _codes_agree_except_on_ties(codes, peer_codes, rows, embed):
    """Equal codes, or two codes at distances from the row equal to within float32 rounding."""
    codes, peer_codes = np.asarray(codes).reshape(-1), np.asarray(peer_codes).reshape(-1)
    differ = np.flatnonzero(codes != peer_codes)
    rows = np.asarray(rows, np.float64).reshape(-1, embed.shape[-1])
    embed = np.asarray(embed, np.float64)
    ours = ((rows[differ] - embed[codes[differ]]) ** 2).sum(1)
    theirs = ((rows[differ] - embed[peer_codes[differ]]) ** 2).sum(1)
    assert np.all(np.abs(ours - theirs) <= 1e-5 * np.maximum(1.0, theirs)), (differ, ours, theirs)
    assert differ.size <= max(1, codes.size // 200)


@pytest.fixture
def encodec_core_vq():
    """EnCodec's ``quantization/core_vq.py`` as published, imported without running the package's
    ``__init__``, which loads the audio model and torchaudio (whose releases stop at torch 2.11's,
    older than the torch the tests run). ``core_vq`` needs only torch, einops and ``encodec.distrib``."""
    spec = importlib.util.find_spec("encodec")
    if spec is None:
        pytest.skip("could not import encodec")
    saved = {name: module for name, module in sys.modules.items() if name == "encodec" or name.startswith("encodec.")}
    package = types.ModuleType("encodec")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["encodec"] = package
    try:
        yield importlib.import_module("encodec.quantization.core_vq")
    finally:
        for name in [name for name in sys.modules if name == "encodec" or name.startswith("encodec.")]:
            del sys.modules[name]
        sys.modules.update(saved)


@pytest.mark.parametrize("num_codebooks, codebook_size, masked", [(1, 64, False), (2, 32, False), (1, 512, True)])
def test_vector_quantize_pytorch_codebook(num_codebooks, codebook_size, masked):
    torch.manual_seed(0)
    dim = 16
    peer = vector_quantize.Codebook(dim, codebook_size, num_codebooks=num_codebooks, decay=0.8, eps=1e-5,
                                    kmeans_init=False, ema_update=True, dead_code_threshold_ratio=0.0)
    ours = EMACodebook(dim, codebook_size, num_codebooks=num_codebooks, decay=0.8, eps=1e-5)
    missing, unexpected = ours.load_state_dict(peer.state_dict(), strict=False)
    assert not missing and unexpected == ["initted"]
    peer.train(), ours.train()
    for _ in range(STEPS):
        x = torch.randn(num_codebooks, 4, 96, dim) if num_codebooks > 1 else torch.randn(4, 96, dim)
        mask = torch.rand(4, 96) > 0.3 if masked else None
        embed_before = ours.embed.clone()
        peer_quantize, peer_codes, _ = peer(x, mask=mask)
        quantize, codes, counts = ours(x, mask=mask)
        for index in range(num_codebooks):
            _codes_agree_except_on_ties(codes.reshape(num_codebooks, -1)[index],
                                        peer_codes.reshape(num_codebooks, -1)[index],
                                        x.reshape(num_codebooks, -1, dim)[index], embed_before[index])
        # (with these seeds no two codes tie, so the states never part)
        assert torch.equal(codes, peer_codes)
        torch.testing.assert_close(quantize, peer_quantize, **FLOAT32_TOLERANCE)
        torch.testing.assert_close(ours.embed, peer.embed, **FLOAT32_TOLERANCE)
        torch.testing.assert_close(ours.embed_avg, peer.embed_avg, **FLOAT32_TOLERANCE)
        torch.testing.assert_close(ours.cluster_size, peer.cluster_size, **FLOAT32_TOLERANCE)
        assert torch.equal(counts, torch.stack([torch.bincount(c, minlength=codebook_size)
                                                for c in codes.reshape(num_codebooks, -1)]))
    assert int((ours.cluster_size > 0).sum()) > 0


def test_encodec_euclidean_codebook(encodec_core_vq):
    torch.manual_seed(1)
    dim, codebook_size = 12, 128
    peer = encodec_core_vq.EuclideanCodebook(dim, codebook_size, decay=0.99, epsilon=1e-5, threshold_ema_dead_code=0)
    ours = EMACodebook(dim, codebook_size, decay=0.99, eps=1e-5, smoothing="laplace")
    with torch.no_grad():
        for name in ("embed", "embed_avg", "cluster_size"):
            getattr(ours, name)[0] = getattr(peer, name)
    peer.train(), ours.train()
    for _ in range(STEPS):
        x = torch.randn(3, 200, dim)
        embed_before = ours.embed[0].clone()
        peer_quantize, peer_codes = peer(x)
        quantize, codes, _ = ours(x)
        _codes_agree_except_on_ties(codes, peer_codes, x, embed_before)
        torch.testing.assert_close(quantize, peer_quantize, **FLOAT32_TOLERANCE)
        torch.testing.assert_close(ours.embed[0], peer.embed, **FLOAT32_TOLERANCE)
        torch.testing.assert_close(ours.embed_avg[0], peer.embed_avg, **FLOAT32_TOLERANCE)
        torch.testing.assert_close(ours.cluster_size[0], peer.cluster_size, **FLOAT32_TOLERANCE)


def test_evaluation_mode_moves_nothing_as_the_peer():
    torch.manual_seed(2)
    peer = vector_quantize.Codebook(8, 32, decay=0.8, dead_code_threshold_ratio=0.0)
    ours = EMACodebook(8, 32)
    ours.load_state_dict(peer.state_dict(), strict=False)
    peer.eval(), ours.eval()
    x = torch.randn(2, 50, 8)
    peer_quantize, peer_codes, _ = peer(x)
    quantize, codes, _ = ours(x)
    assert torch.equal(codes, peer_codes)
    torch.testing.assert_close(quantize, peer_quantize)
    assert torch.equal(ours.embed, peer.embed)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scikit_learn_minibatch_kmeans_partial_fit(dtype):
    cluster = pytest.importorskip("sklearn.cluster")
    rng = np.random.default_rng(3)
    num_clusters, dim = 24, 6
    init = rng.normal(size=(num_clusters, dim)).astype(dtype)
    # reassignment_ratio=0: scikit-learn's random reassignment of small clusters is switched off
    peer = cluster.MiniBatchKMeans(n_clusters=num_clusters, init=init, n_init=1, reassignment_ratio=0.0,
                                   batch_size=256)
    ours = codebooks.MiniBatchKMeans(init)
    for step in range(STEPS):
        X = rng.normal(size=(256, dim)).astype(dtype)
        weights = rng.uniform(0.2, 3.0, size=256).astype(dtype) if step % 2 else None
        peer.partial_fit(X, sample_weight=weights)
        ours.partial_fit(X, sample_weight=weights)
        _codes_agree_except_on_ties(ours.labels_, peer.labels_, X, ours.cluster_centers_)
        np.testing.assert_allclose(ours.cluster_centers_, peer.cluster_centers_, rtol=2e-5, atol=2e-6)
        np.testing.assert_allclose(ours.counts_, peer._counts, rtol=2e-6)
    np.testing.assert_array_equal(ours.predict(X), peer.predict(X))
