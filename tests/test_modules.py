"""The drop-in modules of ``lossd.nn`` against local torch references, end to end through a real server.

Tolerances: float32 work is compared with rtol 1e-5 / atol 1e-6 (float32 eps is 1.2e-7 and
the two sides sum up to ~100 terms in different orders); after many SGD steps the
parameters are compared with atol 1e-5. float64 work (the server computes float64
logits in float64) is compared with 1e-12. float16/bfloat16 are compared with torch's
default tolerances for those dtypes (about one ulp) against the float32 result rounded.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lossd
from lossd._exceptions import LossdError
from lossd_server.config import Settings
from lossd_server.embedded import EmbeddedServer

C_MLP, FEATURES = 6, 20


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _session_names(client: lossd.Client) -> set[str]:
    return {s.name for s in client.list_sessions()}


def _mlp(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(1234)
    return nn.Sequential(nn.Linear(FEATURES, 32), nn.Tanh(), nn.Linear(32, C_MLP)).to(dtype)


def _dataset(n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable data: labels are the argmax of a fixed random linear teacher."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(FEATURES, C_MLP, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    x = torch.randn(n, FEATURES, generator=g, dtype=torch.float64)
    return x.to(dtype), (x @ teacher).argmax(dim=1)


def _assert_params_equal(a: nn.Module, b: nn.Module, atol: float) -> None:
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


def _assert_trained(model: nn.Module, dtype: torch.dtype) -> None:
    """The run really moved the parameters, so equality is not trivial."""
    untouched = _mlp(dtype)
    moved = max((p - q).abs().max().item() for p, q in zip(model.parameters(), untouched.parameters(), strict=True))
    assert moved > 1e-2


# ---------------------------------------------------------------------------
# 1. End to end: CrossEntropyLoss(label_smoothing) in a training loop


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_mlp_trained_through_lossd_cross_entropy_matches_torch(server, dtype: torch.dtype, atol: float) -> None:
    x, y = _dataset(20 * 16, dtype, seed=0)
    local, remote = _mlp(dtype), _mlp(dtype)
    opt_local = torch.optim.SGD(local.parameters(), lr=0.5)
    opt_remote = torch.optim.SGD(remote.parameters(), lr=0.5)
    reference = nn.CrossEntropyLoss(label_smoothing=0.1)
    with lossd.CrossEntropyLoss(label_smoothing=0.1, target=server.target) as criterion:
        for step in range(20):
            xb, yb = x[step * 16 : (step + 1) * 16], y[step * 16 : (step + 1) * 16]
            for model, opt, loss_fn in ((local, opt_local, reference), (remote, opt_remote, criterion)):
                opt.zero_grad()
                loss = loss_fn(model(xb), yb)
                assert loss.dtype == dtype
                loss.backward()
                opt.step()
            torch.testing.assert_close(
                criterion(remote(xb), yb).detach(), reference(local(xb), yb).detach(), rtol=0, atol=10 * atol
            )
    _assert_trained(remote, dtype)
    _assert_params_equal(remote, local, atol)


# ---------------------------------------------------------------------------
# 2. Online Label Smoothing against a local reference


class ReferenceOLS(nn.Module):
    """OLS written from its semantics. S is float32 and column k is the soft label of class k
    (as in the reference module); the epoch's sums are kept in float64, as the server does."""

    def __init__(self, alpha: float, n_classes: int, smoothing: float) -> None:
        super().__init__()
        self.alpha = alpha
        supervise = torch.full((n_classes, n_classes), smoothing / (n_classes - 1), dtype=torch.float32)
        supervise.fill_diagonal_(1.0 - smoothing)
        self.register_buffer("supervise", supervise)
        self.register_buffer("acc", torch.zeros(n_classes, n_classes, dtype=torch.float64))
        self.register_buffer("count", torch.zeros(n_classes, dtype=torch.int64))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        log_p = logits.log_softmax(dim=-1)
        if self.training:
            with torch.no_grad():
                p = log_p.exp()
                hit = p.argmax(dim=-1) == labels
                self.acc.index_add_(1, labels[hit], p[hit].T.to(torch.float64))
                self.count.index_add_(0, labels[hit], torch.ones_like(labels[hit]))
        soft = self.supervise[:, labels].T.to(logits.dtype)
        hard = F.nll_loss(log_p, labels)
        return self.alpha * hard + (1 - self.alpha) * (-(soft * log_p).sum(dim=-1)).mean()

    def next_epoch(self) -> None:
        averaged = (self.acc / self.count.clamp(min=1).to(torch.float64)).to(torch.float32)
        self.supervise = torch.where(self.count.unsqueeze(0) == 0, self.supervise, averaged)
        self.acc.zero_()
        self.count.zero_()


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_mlp_trained_through_lossd_ols_matches_reference(server, dtype: torch.dtype, atol: float) -> None:
    alpha, smoothing, batch, batches = 0.5, 0.1, 32, 6
    x, y = _dataset(batch * batches, dtype, seed=1)
    x_val, y_val = _dataset(64, dtype, seed=2)
    local, remote = _mlp(dtype), _mlp(dtype)
    opt_local = torch.optim.SGD(local.parameters(), lr=0.5)
    opt_remote = torch.optim.SGD(remote.parameters(), lr=0.5)
    reference = ReferenceOLS(alpha, C_MLP, smoothing)
    initial = reference.supervise.clone()
    with lossd.OnlineLabelSmoothing(alpha, C_MLP, smoothing, target=server.target) as criterion:
        torch.testing.assert_close(criterion.supervise, reference.supervise, rtol=0, atol=0)
        for epoch in range(3):
            criterion.train(), reference.train()
            for i in range(batches):
                xb, yb = x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]
                for model, opt, loss_fn in ((local, opt_local, reference), (remote, opt_remote, criterion)):
                    opt.zero_grad()
                    loss_fn(model(xb), yb).backward()
                    opt.step()
            # Validation: eval batches must not count towards the soft labels.
            before = criterion.state()
            criterion.eval(), reference.eval()
            with torch.no_grad():
                val_remote = criterion(remote(x_val), y_val)
                val_local = reference(local(x_val), y_val)
            torch.testing.assert_close(val_remote, val_local, rtol=0, atol=10 * atol)
            after = criterion.state()
            assert torch.equal(after.supervise, before.supervise)
            assert torch.equal(after.accumulator, before.accumulator)
            assert torch.equal(after.counts, before.counts)
            assert torch.equal(after.counts, reference.count), "the server counted other predictions as correct"
            criterion.next_epoch()
            reference.next_epoch()
            assert criterion.epoch == epoch + 1
            torch.testing.assert_close(criterion.supervise, reference.supervise, rtol=0, atol=atol)
        assert not torch.allclose(reference.supervise, initial), "the soft labels never moved"
    _assert_trained(remote, dtype)
    _assert_params_equal(remote, local, atol)


def test_ols_next_epoch_averages_counted_columns_and_keeps_empty_ones(server) -> None:
    """Crafted logits: class 3 is never predicted correctly, so it keeps its column; eval batches do not count."""
    c, alpha = 4, 0.3
    g = torch.Generator().manual_seed(5)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 3, 3, 1, 0])
    logits = torch.randn(10, c, generator=g, dtype=torch.float64)
    logits[torch.arange(10), labels] += 3.0  # mostly correct ...
    logits[labels == 3, 3] -= 10.0  # ... but never class 3
    logits[1, 0] -= 10.0  # and one wrong row of class 0
    eval_logits = torch.randn(6, c, generator=g, dtype=torch.float64) + 5 * F.one_hot(
        torch.tensor([3, 3, 1, 0, 2, 3]), c
    )
    reference = ReferenceOLS(alpha, c, 0.2)
    with lossd.OnlineLabelSmoothing(alpha, c, 0.2, target=server.target) as criterion:
        assert criterion.spec.empty_class == "keep"
        for epoch in range(2):
            # Same batches through both, in train then eval mode.
            for chunk in (slice(0, 5), slice(5, 10)):
                criterion.train(), reference.train()
                torch.testing.assert_close(
                    criterion(logits[chunk], labels[chunk]),
                    reference(logits[chunk], labels[chunk]),
                    rtol=1e-12,
                    atol=1e-12,
                )
            criterion.eval(), reference.eval()
            eval_labels = torch.tensor([3, 3, 1, 0, 2, 3])
            torch.testing.assert_close(
                criterion(eval_logits, eval_labels), reference(eval_logits, eval_labels), rtol=1e-12, atol=1e-12
            )
            assert criterion.state().counts.tolist() == reference.count.tolist() == [2, 2, 3, 0]
            previous = criterion.supervise
            criterion.next_epoch()
            reference.next_epoch()
            new = criterion.supervise
            torch.testing.assert_close(new, reference.supervise, rtol=0, atol=1e-7)
            assert torch.equal(new[:, 3], previous[:, 3]), "class 3 had no correct prediction: its column is kept"
            if epoch == 0:  # the same batches again give the same averages in epoch 1
                assert not torch.equal(new[:, 0], previous[:, 0])
            state = criterion.state()
            assert state.counts.tolist() == [0, 0, 0, 0] and not state.accumulator.any()


# ---------------------------------------------------------------------------
# 3. LabelSmoothingLoss(classes, smoothing, dim)


def _off_target_loss(logits: torch.Tensor, labels: torch.Tensor, smoothing: float, dim: int) -> torch.Tensor:
    """The LabelSmoothingLoss snippet: mean over samples of sum_c -t_c log p_c."""
    log_p = logits.log_softmax(dim=dim)
    c = logits.shape[dim]
    t = torch.full_like(log_p, smoothing / (c - 1)).scatter(dim, labels.unsqueeze(dim), 1.0 - smoothing)
    return (-(t * log_p).sum(dim=dim)).mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape, dim", [((12, 5), -1), ((12, 5), 1), ((4, 5, 7), 1), ((4, 7, 5), -1), ((3, 5, 2, 4), 1)]
)
def test_label_smoothing_loss_is_the_off_target_formula(server, dtype, shape, dim) -> None:
    g = torch.Generator().manual_seed(len(shape) * 10 + dim)
    logits = (3 * torch.randn(shape, generator=g, dtype=dtype)).requires_grad_()
    label_shape = tuple(s for i, s in enumerate(shape) if i != dim % len(shape))
    labels = torch.randint(0, 5, label_shape, generator=g)
    expected_logits = logits.detach().clone().requires_grad_()
    expected = _off_target_loss(expected_logits, labels, 0.2, dim)
    expected.backward()
    with lossd.LabelSmoothingLoss(5, 0.2, dim=dim, target=server.target) as criterion:
        assert criterion.spec.convention == "off_target"
        loss = criterion(logits, labels)
        loss.backward()
    assert loss.shape == () and loss.dtype == dtype
    torch.testing.assert_close(loss, expected.detach(), **_tol(dtype))
    torch.testing.assert_close(logits.grad, expected_logits.grad, **_tol(dtype))
    # The off-target convention differs from torch's uniform one: the test can tell them apart.
    assert not torch.allclose(loss, _uniform_smoothing(logits.detach(), labels, 0.2, dim), rtol=1e-4, atol=0)


def _uniform_smoothing(logits: torch.Tensor, labels: torch.Tensor, smoothing: float, dim: int) -> torch.Tensor:
    return F.cross_entropy(logits.movedim(dim, 1), labels, label_smoothing=smoothing)


def test_label_smoothing_loss_reduction_none_keeps_the_non_class_dims(server) -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (3, 4), generator=g)
    with lossd.LabelSmoothingLoss(5, 0.1, dim=1, reduction="none", target=server.target) as criterion:
        loss = criterion(logits, labels)
    log_p = logits.detach().log_softmax(dim=1)
    t = torch.full_like(log_p, 0.1 / 4).scatter(1, labels.unsqueeze(1), 0.9)
    assert loss.shape == (3, 4)
    torch.testing.assert_close(loss.detach(), -(t * log_p).sum(dim=1), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# 4. CrossEntropyLoss layouts, reductions, weight and ignore_index like torch

LAYOUTS = {
    "unbatched": ((5,), ()),
    "batched": ((8, 5), (8,)),
    "spatial": ((3, 5, 4, 2), (3, 4, 2)),
}


def _compare_with_torch(server, dtype, input_shape, target, reduction, seed, **loss_kwargs) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = (2 * torch.randn(input_shape, generator=g, dtype=dtype)).requires_grad_()
    expected_logits = logits.detach().clone().requires_grad_()
    torch_kwargs = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in loss_kwargs.items()}
    expected = nn.CrossEntropyLoss(reduction=reduction, **torch_kwargs)(expected_logits, target)
    grad_output = torch.randn(expected.shape, generator=g, dtype=dtype)  # arbitrary, not ones
    expected.backward(gradient=grad_output)
    with lossd.CrossEntropyLoss(reduction=reduction, target=server.target, **loss_kwargs) as criterion:
        loss = criterion(logits, target)
        loss.backward(gradient=grad_output)
    assert loss.shape == expected.shape and loss.dtype == dtype
    assert loss.requires_grad
    torch.testing.assert_close(loss.detach(), expected.detach(), **_tol(dtype), equal_nan=False)
    torch.testing.assert_close(logits.grad, expected_logits.grad, **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cross_entropy_layouts_match_torch(server, layout, reduction, dtype) -> None:
    input_shape, target_shape = LAYOUTS[layout]
    target = torch.randint(0, 5, target_shape, generator=torch.Generator().manual_seed(7))
    _compare_with_torch(server, dtype, input_shape, target, reduction, seed=11, label_smoothing=0.0)
    if reduction == "none":  # reduction='none' returns the target's shape
        assert target_shape == LAYOUTS[layout][1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("layout", ["batched", "spatial"])
def test_cross_entropy_weight_and_ignore_index_match_torch(server, layout, label_smoothing, reduction, dtype) -> None:
    input_shape, target_shape = LAYOUTS[layout]
    g = torch.Generator().manual_seed(13)
    weight = torch.rand(5, generator=g, dtype=torch.float64) + 0.25
    target = torch.randint(0, 5, target_shape, generator=g)
    flat = target.view(-1)
    flat[::3] = -100  # the default ignore_index
    _compare_with_torch(
        server, dtype, input_shape, target, reduction, seed=17, weight=weight, label_smoothing=label_smoothing
    )
    # A custom ignore_index, inside the class range.
    target = torch.randint(0, 5, target_shape, generator=g)
    target.view(-1)[0] = 2
    _compare_with_torch(
        server,
        dtype,
        input_shape,
        target,
        reduction,
        seed=19,
        weight=weight,
        ignore_index=2,
        label_smoothing=label_smoothing,
    )
    _compare_with_torch(
        server, dtype, input_shape, target, reduction, seed=23, ignore_index=2, label_smoothing=label_smoothing
    )


# ---------------------------------------------------------------------------
# 5. Gradient scaling, no-grad paths and low-precision logits


def _spy_compute_loss(monkeypatch: pytest.MonkeyPatch, module: lossd.RemoteLoss) -> list[tuple[bool, bool]]:
    """Record (need_grad asked for, gradient returned) for each loss call of ``module``."""
    calls: list[tuple[bool, bool]] = []
    original = module.client.compute_loss

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        result = original(*args, **kwargs)
        calls.append((kwargs["need_grad"], result.grad is not None))
        return result

    monkeypatch.setattr(module.client, "compute_loss", spy)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scaled_loss_backward_scales_the_gradient(server, dtype) -> None:
    g = torch.Generator().manual_seed(21)
    base = 2 * torch.randn(16, 7, generator=g)
    labels = torch.randint(0, 7, (16,), generator=g)
    plain = base.to(dtype).clone().requires_grad_()
    scaled = base.to(dtype).clone().requires_grad_()
    with lossd.CrossEntropyLoss(target=server.target) as criterion:
        criterion(plain, labels).backward()
        (criterion(scaled, labels) * 1024.0).backward()
    reference = base.to(dtype).float().clone().requires_grad_()
    F.cross_entropy(reference, labels).backward()
    if dtype == torch.float32:
        # 1024 is a power of two: scaling is exact, and the server is deterministic.
        assert torch.equal(scaled.grad, plain.grad * 1024)
        torch.testing.assert_close(scaled.grad, reference.grad * 1024, rtol=1e-5, atol=1e-6 * 1024)
    else:
        # What a GradScaler needs: the float32 gradient times the scale, rounded once to float16.
        assert scaled.grad.dtype == dtype
        torch.testing.assert_close(scaled.grad, (reference.grad * 1024).to(dtype))
    assert scaled.grad.abs().max() > 1.0  # the scale really arrived


def test_grad_scaling_keeps_float16_gradients_that_underflow_unscaled(server) -> None:
    """GradScaler exists for this: a gradient of 2e-9 is zero in float16, but 1024x it is not.
    A local torch loss keeps it; so must lossd."""
    logits = torch.tensor([[10.0, -10.0, 0.0]], dtype=torch.float16)
    labels = torch.tensor([0])
    exact = logits.float().requires_grad_()
    F.cross_entropy(exact, labels).backward()
    assert 0 < exact.grad[0, 1] < 2.0**-24  # underflows to 0 in float16 unless scaled first
    local = logits.clone().requires_grad_()
    (F.cross_entropy(local, labels) * 1024.0).backward()
    remote = logits.clone().requires_grad_()
    with lossd.CrossEntropyLoss(target=server.target) as criterion:
        (criterion(remote, labels) * 1024.0).backward()
    expected = (exact.grad[0, 1] * 1024).to(torch.float16)
    assert local.grad[0, 1] == expected != 0
    assert remote.grad[0, 1] == expected, "the scaled float16 gradient underflowed: it was rounded before scaling"


def test_no_gradient_is_requested_without_autograd(server, monkeypatch) -> None:
    g = torch.Generator().manual_seed(31)
    logits = torch.randn(10, 4, generator=g, requires_grad=True)
    labels = torch.randint(0, 4, (10,), generator=g)
    expected = F.cross_entropy(logits.detach(), labels, label_smoothing=0.05)
    with lossd.CrossEntropyLoss(label_smoothing=0.05, target=server.target) as criterion:
        calls = _spy_compute_loss(monkeypatch, criterion)
        with torch.no_grad():
            under_no_grad = criterion(logits, labels)
        detached = criterion(logits.detach(), labels)
        with_grad = criterion(logits, labels)  # control: here a gradient is wanted
    assert calls == [(False, False), (False, False), (True, True)]
    for loss in (under_no_grad, detached):
        assert not loss.requires_grad and loss.grad_fn is None
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert with_grad.requires_grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits_give_loss_and_gradient_in_their_dtype(server, dtype) -> None:
    g = torch.Generator().manual_seed(41)
    logits = (3 * torch.randn(12, 9, generator=g)).to(dtype).requires_grad_()
    labels = torch.randint(0, 9, (12,), generator=g)
    reference = logits.detach().float().requires_grad_()  # the same values, computed in float32
    expected = F.cross_entropy(reference, labels, label_smoothing=0.1)
    expected.backward()
    with lossd.CrossEntropyLoss(label_smoothing=0.1, target=server.target) as criterion:
        loss = criterion(logits, labels)
        loss.backward()
    assert loss.dtype == dtype
    assert logits.grad is not None and logits.grad.dtype == dtype
    torch.testing.assert_close(loss.detach(), expected.detach().to(dtype))
    torch.testing.assert_close(logits.grad, reference.grad.to(dtype))


# ---------------------------------------------------------------------------
# 6. Sessions: private, named, joined, checkpointed


def test_private_session_is_deleted_on_close_and_on_leaving_with(server, client) -> None:
    criterion = lossd.OnlineLabelSmoothing(0.5, 4, target=server.target)
    assert criterion.session.startswith("private-")
    assert criterion.session in _session_names(client)
    criterion.close()
    assert criterion.session not in _session_names(client)
    assert criterion.client.closed  # it opened the channel, so it closes it

    with lossd.CrossEntropyLoss(n_classes=3, target=server.target) as ce:
        name = ce.session
        assert name in _session_names(client)
    assert name not in _session_names(client)

    # Told no C, the session appears at the first forward and still goes away.
    with lossd.CrossEntropyLoss(client=client) as lazy:
        assert lazy.session not in _session_names(client)
        lazy(torch.randn(2, 3), torch.tensor([0, 2]))
        name = lazy.session
        assert name in _session_names(client)
    assert name not in _session_names(client)
    assert not client.closed  # a shared client stays open


def test_named_session_outlives_its_module(server, client, session_name) -> None:
    with lossd.OnlineLabelSmoothing(0.5, 4, session=session_name, target=server.target) as criterion:
        assert criterion.session == session_name
    assert session_name in _session_names(client)
    client.delete_session(session_name)


def test_second_module_with_the_same_name_joins_the_session(server, client, session_name) -> None:
    g = torch.Generator().manual_seed(51)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    logits = torch.randn(8, 4, generator=g) + 4 * F.one_hot(labels, 4)
    try:
        with lossd.OnlineLabelSmoothing(0.4, 4, 0.2, session=session_name, target=server.target) as first:
            initial = first.supervise
            first(logits, labels)
            first.next_epoch()
            assert first.epoch == 1
            with lossd.OnlineLabelSmoothing(0.4, 4, 0.2, session=session_name, target=server.target) as second:
                assert second.epoch == 1
                assert torch.equal(second.supervise, first.supervise)
                assert not torch.equal(second.supervise, initial)
                first.eval(), second.eval()
                assert torch.equal(second(logits, labels), first(logits, labels))
            # Another spec under the same name is refused, typed.
            with pytest.raises(lossd.AlreadyExistsError):
                lossd.OnlineLabelSmoothing(0.9, 4, 0.2, session=session_name, target=server.target, timeout=5)
    finally:
        client.delete_session(session_name)


def _ols_batches(n_batches: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        labels = torch.randint(0, 5, (16,), generator=g)
        logits = 1.5 * torch.randn(16, 5, generator=g) + 2 * F.one_hot(labels, 5)
        out.append((logits, labels))
    return out


def test_state_dict_round_trip_continues_bit_identically(server, client) -> None:
    batches = _ols_batches(9, seed=61)
    kwargs = dict(alpha=0.3, n_classes=5, smoothing=0.15, target=server.target)
    with (
        lossd.OnlineLabelSmoothing(**kwargs) as original,
        lossd.OnlineLabelSmoothing(**kwargs) as restored,
        lossd.OnlineLabelSmoothing(**kwargs) as fresh,
    ):
        for logits, labels in batches[:3]:
            original(logits, labels)
        original.next_epoch()
        for logits, labels in batches[3:5]:  # halfway through epoch 1
            original(logits, labels)
        checkpoint = original.state_dict()
        assert {"supervise", "update", "idx_count"} <= set(checkpoint)

        restored.load_state_dict(checkpoint)
        assert restored.session != original.session
        assert restored.epoch == original.epoch == 1
        for logits, labels in batches[5:]:
            a = logits.clone().requires_grad_()
            b = logits.clone().requires_grad_()
            loss_a, loss_b = original(a, labels), restored(b, labels)
            assert torch.equal(loss_a, loss_b)
            loss_a.backward(), loss_b.backward()
            assert torch.equal(a.grad, b.grad)
        # Control: a module without the checkpoint computes something else (eval: nothing is counted).
        fresh.eval(), restored.eval()
        assert not torch.equal(fresh(*batches[5]), restored(*batches[5]))
        restored.train()
        original.next_epoch()
        restored.next_epoch()
        assert restored.epoch == original.epoch == 2
        assert torch.equal(restored.supervise, original.supervise)
        state_a, state_b = original.state(), restored.state()
        assert torch.equal(state_a.counts, state_b.counts) and torch.equal(state_a.accumulator, state_b.accumulator)


def test_reference_module_checkpoint_loads(server) -> None:
    c = 5
    g = torch.Generator().manual_seed(71)
    supervise = torch.rand(c, c, generator=g).softmax(dim=0)  # columns are soft labels
    idx_count = torch.tensor([3.0, 0.0, 1.0, 2.0, 6.0])  # the reference keeps float32 counts
    update = torch.rand(c, c, generator=g) * idx_count  # column k sums class k's probabilities
    checkpoint = {"supervise": supervise, "update": update, "idx_count": idx_count}
    with lossd.OnlineLabelSmoothing(0.5, c, 0.1, target=server.target) as criterion:
        result = criterion.load_state_dict(checkpoint, strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        state = criterion.state()
        assert torch.equal(state.supervise, supervise)
        assert torch.equal(state.accumulator, update.double())
        assert state.counts.dtype == torch.int64 and state.counts.tolist() == [3, 0, 1, 2, 6]

        # The loaded soft labels are the ones used.
        labels = torch.tensor([0, 1, 2, 3, 4, 1])
        logits = torch.randn(6, c, generator=g, dtype=torch.float64)
        criterion.eval()
        log_p = logits.log_softmax(dim=1)
        expected = 0.5 * F.nll_loss(log_p, labels) + 0.5 * (-(supervise[:, labels].T.double() * log_p).sum(1)).mean()
        torch.testing.assert_close(criterion(logits, labels), expected, rtol=1e-12, atol=1e-12)

        criterion.next_epoch()
        averaged = (update.double() / idx_count.double().clamp(min=1)).float()
        expected_next = torch.where(idx_count.unsqueeze(0) == 0, supervise, averaged)
        assert torch.equal(criterion.supervise, expected_next)

        # Counts that are not whole numbers are refused.
        with pytest.raises(RuntimeError, match="idx_count"):
            criterion.load_state_dict({**checkpoint, "idx_count": idx_count + 0.5})


# ---------------------------------------------------------------------------
# 7. Target resolution


def test_lossd_target_env_is_used_when_no_target_is_given(server, client, monkeypatch) -> None:
    monkeypatch.setenv("LOSSD_TARGET", server.target)
    with lossd.CrossEntropyLoss(n_classes=3, timeout=5) as criterion:
        assert criterion.client.target == server.target
        assert criterion.session in _session_names(client)  # it really talked to that server
        loss = criterion(torch.zeros(2, 3), torch.tensor([0, 1]))
        torch.testing.assert_close(loss, torch.tensor(3.0).log())
    # An explicit target wins over the environment.
    monkeypatch.setenv("LOSSD_TARGET", "127.0.0.1:1")
    with lossd.CrossEntropyLoss(n_classes=3, target=server.target, timeout=5) as criterion:
        assert criterion.client.target == server.target


def test_default_target_is_localhost_50051(monkeypatch) -> None:
    monkeypatch.delenv("LOSSD_TARGET", raising=False)
    assert "LOSSD_TARGET" not in os.environ
    with lossd.Client() as client:
        assert client.target == "localhost:50051"
    criterion = lossd.CrossEntropyLoss()  # told no C: it does not connect yet
    try:
        assert criterion.client.target == "localhost:50051"
    finally:
        criterion.close()


# ---------------------------------------------------------------------------
# 8. Typed errors


def test_nothing_listening_raises_unavailable_error() -> None:
    target = f"127.0.0.1:{_free_port()}"
    with pytest.raises(lossd.UnavailableError) as raised:
        lossd.OnlineLabelSmoothing(0.5, 4, target=target, timeout=2, retry_deadline=0.3)
    assert isinstance(raised.value, lossd.LossdError)
    # Retried for the deadline, then the error names the server and how long it tried.
    assert target in raised.value.message and "after retrying for 0." in raised.value.message
    # Told no C, the module connects at its first forward: same error there.
    criterion = lossd.CrossEntropyLoss(target=target, timeout=2, retry_deadline=0.3)
    try:
        with pytest.raises(lossd.UnavailableError):
            criterion(torch.randn(3, 4, requires_grad=True), torch.tensor([0, 1, 2]))
    finally:
        criterion.close()


@pytest.fixture()
def doomed_server() -> Iterator[EmbeddedServer]:
    running = EmbeddedServer(Settings(host="127.0.0.1", port=0, device="cpu", workers=1, grace_seconds=0)).start()
    try:
        yield running
    finally:
        running.stop(0)


def test_server_gone_mid_training_raises_typed_errors(doomed_server) -> None:
    with lossd.CrossEntropyLoss(n_classes=4, target=doomed_server.target, timeout=2, retry_deadline=0.3) as criterion:
        logits, labels = torch.randn(3, 4, requires_grad=True), torch.tensor([0, 1, 2])
        criterion(logits, labels).backward()  # the loss stream is open
        doomed_server.stop(0)
        with pytest.raises(LossdError):  # the broken stream: a lossd error, never a raw grpc.RpcError
            criterion(logits, labels)
        with pytest.raises(lossd.UnavailableError):  # a new stream finds nothing listening
            criterion(logits, labels)


# ---------------------------------------------------------------------------
# 9. The public surface


def test_every_name_in_all_exists() -> None:
    assert len(lossd.__all__) == len(set(lossd.__all__))
    for name in lossd.__all__:
        assert hasattr(lossd, name), name


def _subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub} | _subclasses(sub)
    return found


def test_every_public_exception_is_exported() -> None:
    public_attrs = {
        name
        for name, value in vars(lossd).items()
        if not name.startswith("_") and isinstance(value, type) and issubclass(value, BaseException)
    }
    lossd_errors = {cls for cls in {LossdError} | _subclasses(LossdError) if not cls.__name__.startswith("_")}
    assert len(lossd_errors) >= 13
    missing = sorted(cls.__name__ for cls in lossd_errors if cls.__name__ not in lossd.__all__)
    missing += sorted(name for name in public_attrs if name not in lossd.__all__)
    assert not missing, f"public exceptions missing from lossd.__all__: {missing}"
    for cls in lossd_errors:
        assert getattr(lossd, cls.__name__) is cls
