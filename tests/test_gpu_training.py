"""The GPU step inside real torch training on a CUDA GPU: captured in a CUDA graph and replayed,
on a side stream, and with a bad label under ``sync=False``. These need torch with CUDA and a
GPU (benchmarks/gpu_device_run.sh runs them there); elsewhere they are skipped.

A CUDA graph is the sharpest test of the stream and allocation promises: a host wait, an
allocation outside torch's pool, or a launch on another stream than the capturing one breaks
the capture or makes the replays differ from the eager steps."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs torch with CUDA and a GPU")

from numba import cuda as numba_cuda  # noqa: E402

import centerkern  # noqa: E402
import centerkern.cuda  # noqa: E402
from centerkern.torch import CenterLoss  # noqa: E402

# 200 rows: four tiles of the CUDA kernels, the last one partial, so that the hot classes span
# tiles and the spanning-class kernel (atomics, or the deterministic slots) runs under capture
CLASSES, INPUTS, FEATURES, BATCH = 10, 16, 8, 200
ALPHA = {"facenet": 0.95, "wen": 0.5}  # facenet trains with 0.95; 0.5 diverges with hot classes


class _Net(torch.nn.Module):
    def __init__(self, rule, deterministic):
        super().__init__()
        self.embed = torch.nn.Linear(INPUTS, FEATURES)
        self.classify = torch.nn.Linear(FEATURES, CLASSES)
        self.center_loss = CenterLoss(CLASSES, FEATURES, alpha=ALPHA[rule], rule=rule, deterministic=deterministic)

    def forward(self, x, y):
        features = self.embed(x)
        return torch.nn.functional.cross_entropy(self.classify(features), y) + 0.1 * self.center_loss(features, y)


def _batches(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, INPUTS, generator=generator),
             torch.randint(0, CLASSES, (BATCH,), generator=generator) % 3) for _ in range(count)]  # hot classes


def _train_step(net, optimizer, x, y):
    optimizer.zero_grad(set_to_none=False)
    loss = net(x, y)
    loss.backward()
    optimizer.step()
    return loss


@pytest.mark.parametrize("rule", ["facenet", "wen"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_training_step_captured_in_a_cuda_graph_equals_eager_steps(rule, deterministic):
    torch.manual_seed(0)
    eager = _Net(rule, deterministic).cuda()
    graphed = _Net(rule, deterministic).cuda()
    graphed.load_state_dict(eager.state_dict())
    eager_optimizer = torch.optim.SGD(eager.parameters(), lr=0.1)
    graphed_optimizer = torch.optim.SGD(graphed.parameters(), lr=0.1)
    warmup, replays = _batches(3, seed=1), _batches(5, seed=2)

    static_x = torch.zeros(BATCH, INPUTS, device="cuda")
    static_y = torch.zeros(BATCH, dtype=torch.int64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch asks before a capture
        for x, y in warmup:
            static_x.copy_(x)
            static_y.copy_(y)
            _train_step(graphed, graphed_optimizer, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    for x, y in warmup:
        _train_step(eager, eager_optimizer, x.cuda(), y.cuda())

    graph = torch.cuda.CUDAGraph()
    with numba_cuda.defer_cleanup(), torch.cuda.graph(graph):  # no Numba cuMemFree inside the capture
        static_loss = _train_step(graphed, graphed_optimizer, static_x, static_y)

    centers_before = graphed.center_loss.centers.clone()
    for x, y in replays:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        eager_loss = _train_step(eager, eager_optimizer, x.cuda(), y.cuda())
        torch.testing.assert_close(static_loss, eager_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(graphed.center_loss.centers, eager.center_loss.centers, rtol=1e-5, atol=1e-6)
        for mine, theirs in zip(graphed.parameters(), eager.parameters()):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    assert not torch.equal(graphed.center_loss.centers, centers_before)  # the replays moved the centers
    centerkern.cuda.check_errors()


def test_gpu_module_on_a_side_stream_reads_what_that_stream_wrote():
    """The features are written on a side stream behind a slow kernel; the module, called under
    that stream, must queue behind it (a launch on another stream would read them unwritten)."""
    rng = np.random.default_rng(3)
    features = rng.standard_normal((4096, 256)).astype(np.float32)
    labels = rng.integers(0, 50, 4096)
    reference = centerkern.center_loss(features, labels, np.zeros((50, 256), np.float32), 0.5, rule="wen",
                                       backend="numpy")
    module = CenterLoss(50, 256, alpha=0.5, rule="wen").cuda()
    source = torch.as_tensor(features, device="cuda")
    device_labels = torch.as_tensor(labels, device="cuda")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # tens of milliseconds of GPU time before the features exist
        written_late = source * 1.0
        loss = module(written_late, device_labels)
    side.synchronize()
    assert float(loss) == pytest.approx(reference.loss, rel=1e-5)
    np.testing.assert_allclose(module.centers.cpu().numpy(), reference.centers, rtol=1e-5, atol=1e-6)


def test_gpu_module_bad_label_is_raised_by_check_errors_and_nothing_moves():
    module = CenterLoss(5, 4, alpha=0.5, rule="facenet").cuda()
    module.centers.normal_()
    before = module.centers.clone()
    labels = torch.tensor([0, 1, 7, 2], device="cuda")
    loss = module(torch.randn(4, 4, device="cuda", requires_grad=True), labels)  # returns at once
    assert torch.isnan(loss).item()
    with pytest.raises(IndexError, match=r"label 7 at position 2"):
        centerkern.cuda.check_errors()
    assert torch.equal(module.centers, before)


def test_gpu_results_come_from_torchs_allocator_on_the_current_stream():
    rng = np.random.default_rng(4)
    features, labels = rng.standard_normal((256, 32)).astype(np.float32), rng.integers(0, 10, 256)
    reference = centerkern.center_loss(features, labels, np.zeros((10, 32), np.float32), 0.5, backend="numpy")
    device_features, device_labels = torch.as_tensor(features, device="cuda"), torch.as_tensor(labels, device="cuda")
    centers = torch.zeros(10, 32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # the inputs were written on the default stream
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated()
    with torch.cuda.stream(side):
        result = centerkern.center_loss(device_features, device_labels, centers, 0.5, out=centers, sync=False)
        # torch's allocator holds the grad (B x D float32) and the 0-d float64 loss
        assert torch.cuda.memory_allocated() - allocated >= 256 * 32 * 4 + 8
    side.synchronize()
    assert isinstance(result.loss, torch.Tensor) and result.loss.shape == () and result.loss.is_cuda
    assert result.loss.dtype == torch.float64 and isinstance(result.grad, torch.Tensor) and result.grad.is_cuda
    assert float(result.loss) == pytest.approx(reference.loss, rel=1e-6)
    np.testing.assert_allclose(result.grad.cpu().numpy(), reference.grad, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(centers.cpu().numpy(), reference.centers, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="make the stream current"):
        centerkern.center_loss(device_features, device_labels, centers, 0.5, stream=side)  # not torch's current
