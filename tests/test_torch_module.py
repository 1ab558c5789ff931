"""centerkern.torch.CenterLoss against the numpy backend and against torch's own autograd on the
SPEC formulas."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import centerkern  # noqa: E402
from centerkern.torch import CenterLoss  # noqa: E402
from conftest import BACKENDS, assert_matches  # noqa: E402

SEED_FEATURES = [[1, 1, 1, 1, 1], [1, 1, 2, 1, 1], [1, 1, 3, 1, 1], [1, 1, 4, 1, 1], [2, 2, 2, 1, 2],
                 [2, 2, 2, 2, 2], [2, 2, 2, 3, 2], [3, 3, 3, 3, 1], [3, 3, 3, 3, 2]]
SEED_LABELS = [0, 0, 0, 0, 1, 1, 1, 2, 2]


def _batch(seed, batch=40, classes=6, width=5, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, width, generator=generator, dtype=dtype)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    labels[: batch // 2] = 1  # a hot class
    return features, labels


def _formula_loss(rule, features, labels, centers):
    """The SPEC table's loss written in torch ops, for torch's autograd to differentiate."""
    difference = features - centers[labels]
    squares = difference.pow(2).sum()
    batch, width = features.shape
    return {"facenet": squares / (batch * width), "wen": squares / (2 * batch), "pytorch": squares / batch}[rule]


@pytest.mark.parametrize("rule", centerkern.RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_training_steps_match_the_reference_and_autograd(rule, dtype):
    module = CenterLoss(6, 5, alpha=0.7, rule=rule, dtype=dtype)
    with torch.no_grad():
        module.centers.copy_(torch.randn(6, 5, generator=torch.Generator().manual_seed(9), dtype=dtype))
    centers = module.centers.detach().numpy().copy()
    pointer = module.centers.data_ptr()
    for step in range(3):
        features, labels = _batch(step, dtype=dtype)
        features.requires_grad_()
        expected = centerkern.center_loss(features.detach().numpy(), labels.numpy(), centers, 0.7, rule=rule, backend="numpy")
        # autograd on the formula, with the centers as they were before the step
        reference_features = features.detach().clone().requires_grad_()
        reference_centers = torch.from_numpy(centers.copy()).requires_grad_()
        _formula_loss(rule, reference_features, labels, reference_centers).backward()

        module.zero_grad()
        loss = module(features, labels)
        loss.backward()

        assert loss.dtype == dtype and loss.shape == ()
        assert loss.item() == pytest.approx(expected.loss, rel=1e-6)
        assert features.grad.dtype == dtype
        assert_matches(features.grad.numpy(), reference_features.grad.numpy(), features.detach().numpy(), centers)
        assert_matches(module.centers.detach().numpy(), expected.centers, features.detach().numpy(), centers)
        assert module.centers.data_ptr() == pointer  # moved in place (pytorch: left for the optimizer)
        if rule == "pytorch":
            assert_matches(module.centers.grad.numpy(), reference_centers.grad.numpy(), features.detach().numpy(), centers)
            with torch.no_grad():  # the caller's optimizer: plain SGD
                module.centers -= 0.5 * module.centers.grad
        centers = module.centers.detach().numpy().copy()


def test_seed_example_reproduces_tensorflows_numbers():
    module = CenterLoss(3, 5, alpha=0.5)
    features = torch.tensor(SEED_FEATURES, dtype=torch.float32)
    labels = torch.tensor(SEED_LABELS)
    losses = [float(module(features, labels)) for _ in range(3)]
    np.testing.assert_allclose(losses, [4.1111111, 1.4111111, 1.1611111], rtol=1e-6)
    np.testing.assert_allclose(module.centers.numpy(), [[2, 2, 5, 2, 2], [2.25] * 5, [3, 3, 3, 3, 1.5]], rtol=1e-6)


@pytest.mark.parametrize("rule", centerkern.RULES)
def test_eval_mode_gives_the_loss_and_leaves_the_centers(rule):
    module = CenterLoss(6, 5, alpha=0.7, rule=rule)
    features, labels = _batch(1)
    module(features, labels)  # one training step: the centers are no longer at their start
    module.eval()
    before = module.centers.detach().clone()
    tracked = features.clone().requires_grad_()
    loss = module(tracked, labels)
    loss.backward()
    expected = centerkern.center_loss(features.numpy(), labels.numpy(), before.numpy(), 0.7, rule=rule, backend="numpy")
    assert loss.item() == pytest.approx(expected.loss, rel=1e-6)
    assert_matches(tracked.grad.numpy(), expected.grad, features.numpy(), before.numpy())
    assert torch.equal(module.centers.detach(), before)
    with torch.no_grad():
        assert float(module(features, labels)) == pytest.approx(expected.loss, rel=1e-6)
    assert torch.equal(module.centers.detach(), before)


def test_no_grad_training_still_moves_facenet_and_wen_centers():
    module = CenterLoss(6, 5, alpha=0.5, rule="wen")
    features, labels = _batch(2)
    expected = centerkern.center_loss(features.numpy(), labels.numpy(), np.zeros((6, 5), np.float32), 0.5, rule="wen", backend="numpy")
    with torch.no_grad():
        module(features, labels)
    assert_matches(module.centers.numpy(), expected.centers, features.numpy())


def test_centers_are_a_buffer_or_a_parameter_by_rule_and_state_dict_round_trips():
    for rule in ("facenet", "wen"):
        module = CenterLoss(4, 3, rule=rule)
        assert "centers" in dict(module.named_buffers()) and not list(module.parameters())
        assert not module.centers.requires_grad and torch.count_nonzero(module.centers) == 0
    module = CenterLoss(4, 3, rule="pytorch")
    assert [name for name, _ in module.named_parameters()] == ["centers"]
    assert isinstance(module.centers, torch.nn.Parameter) and module.centers.shape == (4, 3)

    trained = CenterLoss(6, 5, alpha=0.5, rule="wen")
    trained(*_batch(3))
    restored = CenterLoss(6, 5, alpha=0.5, rule="wen")
    restored.load_state_dict(trained.state_dict())
    assert torch.equal(restored.centers, trained.centers)
    features, labels = _batch(4)
    assert float(restored(features, labels)) == float(trained(features, labels))
    assert torch.equal(restored.centers, trained.centers)


def test_mixed_precision_features_are_promoted_and_their_grad_comes_back_in_their_dtype():
    module = CenterLoss(6, 5, rule="wen")
    features, labels = _batch(5)
    half = features.to(torch.bfloat16).requires_grad_()
    loss = module(half, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and half.grad.dtype == torch.bfloat16
    expected = centerkern.center_loss(half.detach().float().numpy(), labels.numpy(), np.zeros((6, 5), np.float32), 0.5, rule="wen", backend="numpy")
    np.testing.assert_allclose(half.grad.float().numpy(), expected.grad, rtol=1e-2, atol=1e-4)


def test_the_process_group_is_named_group_as_in_centerkern_distributed_and_the_old_name_warns():
    group = object()  # kept at construction; only a distributed step would use it
    module = CenterLoss(6, 5, rule="wen", group=group)
    assert module.group is group and module.distributed
    with pytest.warns(DeprecationWarning, match=r"process_group=\.\.\.\) is deprecated: pass group="):
        old = CenterLoss(6, 5, rule="wen", process_group=group)
    assert old.group is group and old.process_group is group and old.distributed
    assert repr(old) == repr(module) == ("CenterLoss(num_classes=6, feat_dim=5, alpha=0.5, rule='wen', "
                                         "backend='auto', distributed=True)")
    with pytest.raises(TypeError, match="both group= and process_group="):
        CenterLoss(6, 5, rule="wen", group=group, process_group=group)
    import inspect

    assert inspect.signature(CenterLoss).parameters["backend"].default == "auto"


def test_bad_input_is_an_error_and_leaves_the_centers():
    module = CenterLoss(6, 5)
    features, labels = _batch(6)
    before = module.centers.clone()
    labels[3] = 6
    with pytest.raises(IndexError, match="label 6 at position 3"):
        module(features, labels)
    with pytest.raises(TypeError, match="dtypes must match"):
        module(features.double(), labels % 6)
    module.eval()
    with pytest.raises(ValueError, match="shape"):
        module(features[:5], labels % 6)
    assert torch.equal(module.centers, before)
    with pytest.raises(ValueError, match="rule"):
        CenterLoss(3, 2, rule="paddle")


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_trains_the_same(backend):
    """CPU tensors through each backend (``cuda`` copies them to the device and back)."""
    modules = [CenterLoss(6, 5, rule="facenet", alpha=0.9, backend=b) for b in ("numpy", backend)]
    for step in range(3):
        features, labels = _batch(10 + step)
        losses = [float(m(features, labels)) for m in modules]
        assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    assert_matches(modules[1].centers.numpy(), modules[0].centers.numpy())


def test_cuda_module_updates_device_centers_in_place():
    if not torch.cuda.is_available() or "cuda" not in centerkern.backends():
        pytest.skip("needs a CUDA GPU and a CUDA build of torch")
    module = CenterLoss(6, 5, rule="wen", device="cuda")
    pointer = module.centers.data_ptr()
    features, labels = _batch(7)
    expected = centerkern.center_loss(features.numpy(), labels.numpy(), np.zeros((6, 5), np.float32), 0.5, rule="wen", backend="numpy")
    tracked = features.cuda().requires_grad_()
    loss = module(tracked, labels.cuda())
    loss.backward()
    assert loss.is_cuda and tracked.grad.is_cuda and module.centers.data_ptr() == pointer
    assert_matches(module.centers.cpu().numpy(), expected.centers, features.numpy())
    assert_matches(tracked.grad.cpu().numpy(), expected.grad, features.numpy())


def test_autograd_sees_the_in_place_update_of_saved_centers():
    """A graph that saved the centers before a step must refuse to backpropagate through the
    moved values (as for any in-place write), not silently use them."""
    module = CenterLoss(6, 5, rule="wen")
    weights = torch.ones(3, 5, requires_grad=True)
    saved = (weights * module.centers[:3]).sum()  # mul saves the centers for its backward
    module(*_batch(8))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


def test_a_compiled_training_step_around_the_module_matches_eager():
    """torch.compile of a step holding the module: the module runs behind a graph break, and
    the compiled step computes what the eager one does."""
    results = []
    for compiled in (False, True):
        embed = torch.nn.Linear(4, 5)
        with torch.no_grad():
            embed.weight.copy_(torch.arange(20.0).reshape(5, 4) / 20)
            embed.bias.zero_()
        module = CenterLoss(6, 5, rule="wen")

        def step(inputs, labels):
            return module(embed(inputs), labels)

        run = torch.compile(step) if compiled else step
        for seed in range(2):
            generator = torch.Generator().manual_seed(seed)
            inputs, labels = torch.randn(12, 4, generator=generator), torch.randint(0, 6, (12,), generator=generator)
            embed.zero_grad()
            loss = run(inputs, labels)
            loss.backward()
        results.append((loss.item(), embed.weight.grad.clone(), module.centers.clone()))
    (eager_loss, eager_grad, eager_centers), (compiled_loss, compiled_grad, compiled_centers) = results
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-6)
    torch.testing.assert_close(compiled_grad, eager_grad)
    torch.testing.assert_close(compiled_centers, eager_centers)


@pytest.mark.parametrize("rule", centerkern.RULES)
def test_second_order_gradients_match_torch_autograd_of_the_formulas(rule):
    """A gradient penalty (create_graph=True, then backward through the gradient) gets the
    center-loss term's second-order part, as autograd of the SPEC formula gives it."""
    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(12, 3, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 2, 0, 0, 3, 3, 1, 2, 0, 1], dtype=torch.uint8)  # any integer dtype
    start = torch.randn(4, 4, generator=generator, dtype=torch.float64)

    def penalised_step(loss_of):
        weight = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(3, 4).requires_grad_()
        features = inputs @ weight
        loss = loss_of(features)
        (gradient,) = torch.autograd.grad(loss, features, create_graph=True)
        (loss + gradient.pow(2).sum()).backward()
        return weight.grad

    module = CenterLoss(4, 4, alpha=0.5, rule=rule, dtype=torch.float64)
    with torch.no_grad():
        module.centers.copy_(start)
    ours = penalised_step(lambda features: module(features, labels))
    centers = start.clone().requires_grad_(rule == "pytorch")
    theirs = penalised_step(lambda features: _formula_loss(rule, features, labels.long(), centers))
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    if rule == "pytorch":
        torch.testing.assert_close(module.centers.grad, centers.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rule", ["facenet", "wen"])
def test_checkpointing_that_recomputes_the_module_is_refused_and_the_rest_is_exact(rule):
    from torch.utils.checkpoint import checkpoint

    features, labels = _batch(21, dtype=torch.float64)
    linear = torch.nn.Linear(5, 5, dtype=torch.float64)

    def run(checkpointed):
        module = CenterLoss(6, 5, alpha=0.5, rule=rule, dtype=torch.float64)
        linear.zero_grad()
        loss = checkpointed(lambda x: module(linear(x), labels), features)
        loss.backward()
        return loss.detach(), module.centers.clone(), linear.weight.grad.clone()

    plain = run(lambda function, x: function(x))
    # non-reentrant, the module last: the recomputation stops before it (the default early stop)
    exact = run(lambda function, x: checkpoint(function, x, use_reentrant=False))
    for a, b in zip(plain, exact):
        torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match=r"moves its centers in the forward pass, and this forward runs inside "
                                           r"a backward pass: activation checkpointing"):
        run(lambda function, x: checkpoint(function, x.requires_grad_(), use_reentrant=True))


def test_centers_in_a_dtype_the_kernels_do_not_compute_in_are_refused_clearly():
    for cast in ("bfloat16", "half"):
        module = getattr(CenterLoss(6, 5, rule="wen"), cast)()
        features, labels = _batch(22)
        with pytest.raises(TypeError, match=r"centers must be float32 or float64, got dtype (bfloat16|float16)"):
            module(features, labels)


def test_the_functions_on_torch_tensors_bypass_autograd_as_documented():
    features, labels = _batch(23)
    weight = torch.ones(5, 5, requires_grad=True)
    embedded = features @ weight
    centers = torch.nn.Parameter(torch.randn(6, 5, generator=torch.Generator().manual_seed(3)))
    assert not centerkern.gather_centers(centers, labels).requires_grad  # not an autograd op
    start = centers.detach().clone()
    version = centers._version
    result = centerkern.center_loss(embedded.detach(), labels, centers, 0.5, rule="wen", out=centers)
    assert centers._version > version  # the leaf was written in place, as an optimizer writes it
    expected = torch.autograd.grad(0.1 * _formula_loss("wen", embedded, labels, start), weight, retain_graph=True)[0]
    embedded.backward(0.1 * result.grad)  # the README's pattern: the kernel's grad handed to autograd
    torch.testing.assert_close(weight.grad, expected)


def _transforms(module, features, labels):
    """Each transform the module cannot run under, as a user would write it (the module inside
    a model for the TorchScript ones)."""
    model = torch.nn.Sequential(torch.nn.Identity())
    model.center_loss = module
    detached = features.detach()
    return {
        "torch.func.grad": lambda: torch.func.grad(lambda f: module(f, labels))(detached),
        "torch.vmap": lambda: torch.vmap(lambda f: module(f, labels))(detached[None]),
        "torch.func.jacrev": lambda: torch.func.jacrev(lambda f: module(f, labels))(detached),
        "torch.jit.script": lambda: torch.jit.script(model),
        "torch.jit.trace": lambda: torch.jit.trace(module, (detached, labels)),
    }


@pytest.mark.parametrize("rule", centerkern.RULES)
@pytest.mark.parametrize("transform", ["torch.func.grad", "torch.vmap", "torch.func.jacrev", "torch.jit.script",
                                       "torch.jit.trace"])
def test_transforms_that_cannot_run_the_kernels_are_refused_in_centerkerns_words_before_anything_moves(rule, transform):
    module = CenterLoss(6, 3, alpha=0.5, rule=rule)
    features = torch.randn(5, 3, requires_grad=True)
    labels = torch.tensor([0, 1, 1, 4, 0])
    before = module.centers.detach().clone()
    with pytest.raises(RuntimeError, match="centerkern.torch.CenterLoss") as refused:
        _transforms(module, features, labels)[transform]()
    message = str(refused.value)
    assert "torch.compile" in message or "loss.backward()" in message  # and what works instead
    assert torch.equal(module.centers.detach(), before)
    # and the module still trains as usual afterwards: one step, one move
    expected = centerkern.center_loss(features.detach().numpy(), labels.numpy(), before.numpy(), 0.5, rule=rule,
                                      backend="numpy")
    module(features, labels).backward()
    if rule != "pytorch":
        assert_matches(module.centers.detach().numpy(), expected.centers, features.detach().numpy(), before.numpy())
