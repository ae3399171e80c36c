"""Online Label Smoothing over several epochs, against an independent float64 re-derivation.

``ReferenceOLS`` below is written from the rules of the reference module
(online-label-smoothing-pt), not from ``lossd.functional``:

* ``S`` is C x C and column k is the soft label of class k.
* loss = alpha * CE(z, y) + (1 - alpha) * mean_i sum_c -S[c, y_i] log p_ic (mean over non-ignored rows).
* grad_i = ((alpha + (1 - alpha) * sigma_i) p_i - alpha onehot(y_i) - (1 - alpha) S[:, y_i]) / N,
  sigma_i = sum_c S[c, y_i].
* Training rows with argmax(p_i) == y_i add p_i into U[:, y_i] and 1 into count[y_i].
* next_epoch: S[:, k] = U[:, k] / count[k]; an empty class follows the ``empty_class`` policy.

Tolerances: the server computes the softmax in float32 (relative error ~1e-7 per
element) and stores S in float32 (rounding ~6e-8 relative), while the reference
is float64 throughout; U only ever depends on the logits, so these errors do not
compound across epochs. rtol 1e-5 / atol 1e-6 leaves more than 10x margin while
still catching any real semantic error (a wrong column, a missed sample, a
wrong policy all move values by >= 1e-3).
"""

from __future__ import annotations

import pytest
import torch

import lossd


@pytest.fixture()
def client(kernel_client: lossd.Client) -> lossd.Client:
    """Every server test here runs once per math kernel (the server's default, fused, and eager)."""
    return kernel_client


C = 6
N = 32
EPS = 0.2
ALPHA = 0.3
IGNORE = -100
RTOL, ATOL = 1e-5, 1e-6
N_IGNORED = 4  # ignored rows per batch

# Classes that get no correct training prediction in each epoch (data is built so).
EMPTY_BY_EPOCH: dict[int, set[int]] = {0: {C - 1}, 1: {1}, 2: set(), 3: {0, C - 1}}

INITS = ("label_smoothing", "uniform", "zeros")
POLICIES = ("keep", "uniform", "zero")


# --------------------------------------------------------------------------------------
# The independent reference


class ReferenceOLS:
    """Float64 OLS written from the rules, one sample at a time."""

    def __init__(
        self, n_classes: int, eps: float, alpha: float, init: str, empty_class: str, ignore_index: int = IGNORE
    ) -> None:
        self.c = n_classes
        self.alpha = alpha
        self.empty_class = empty_class
        self.ignore_index = ignore_index
        if init == "label_smoothing":
            s = torch.full((n_classes, n_classes), eps / (n_classes - 1), dtype=torch.float64)
            for k in range(n_classes):
                s[k, k] = 1.0 - eps
        elif init == "uniform":
            s = torch.full((n_classes, n_classes), 1.0 / n_classes, dtype=torch.float64)
        elif init == "zeros":
            s = torch.zeros((n_classes, n_classes), dtype=torch.float64)
        else:
            raise AssertionError(init)
        self.S = s
        self.U = torch.zeros((n_classes, n_classes), dtype=torch.float64)
        self.count = torch.zeros(n_classes, dtype=torch.int64)
        self.epoch = 0
        self.samples = 0

    def forward(self, logits: torch.Tensor, labels: torch.Tensor):
        """(loss, grad [N, C], n_used, [(label, p)] of the correct rows), without touching state."""
        z = logits.to(torch.float64)
        grad = torch.zeros_like(z)
        total = 0.0
        used = 0
        correct: list[tuple[int, torch.Tensor]] = []
        for i in range(z.shape[0]):
            y = int(labels[i])
            if y == self.ignore_index:
                continue
            log_p = z[i] - torch.logsumexp(z[i], dim=0)
            p = log_p.exp()
            soft = self.S[:, y]
            total += self.alpha * float(-log_p[y]) + (1.0 - self.alpha) * float(-(soft * log_p).sum())
            sigma = float(soft.sum())
            onehot = torch.zeros(self.c, dtype=torch.float64)
            onehot[y] = 1.0
            grad[i] = (self.alpha + (1.0 - self.alpha) * sigma) * p - self.alpha * onehot - (1.0 - self.alpha) * soft
            used += 1
            if int(torch.argmax(p)) == y:
                correct.append((y, p))
        assert used > 0
        return total / used, grad / used, used, correct

    def train(self, logits: torch.Tensor, labels: torch.Tensor):
        loss, grad, used, correct = self.forward(logits, labels)
        for y, p in correct:  # duplicates all count
            self.U[:, y] += p
            self.count[y] += 1
        self.samples += used
        return loss, grad, used, len(correct)

    def eval(self, logits: torch.Tensor, labels: torch.Tensor):
        loss, grad, used, correct = self.forward(logits, labels)
        return loss, grad, used, len(correct)

    def next_epoch(self) -> None:
        new = torch.empty_like(self.S)
        for k in range(self.c):
            if self.count[k] > 0:
                new[:, k] = self.U[:, k] / float(self.count[k])
            elif self.empty_class == "keep":
                new[:, k] = self.S[:, k]
            elif self.empty_class == "uniform":
                new[:, k] = 1.0 / self.c
            elif self.empty_class == "zero":
                new[:, k] = 0.0
            else:
                raise AssertionError(self.empty_class)
        self.S = new
        self.U = torch.zeros_like(self.U)
        self.count = torch.zeros_like(self.count)
        self.epoch += 1
        self.samples = 0

    def empty_classes(self) -> set[int]:
        return {k for k in range(self.c) if int(self.count[k]) == 0}


# --------------------------------------------------------------------------------------
# Data


def make_batch(
    gen: torch.Generator,
    *,
    empty: set[int],
    dtype: torch.dtype = torch.float32,
    label: int | None = None,
    bump_fraction: float = 0.6,
    bump: float = 3.0,
    n_ignored: int = N_IGNORED,
    suppress_empty: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, C] logits in ``dtype`` and [N] labels.

    A ``bump_fraction`` of rows get ``bump`` added to their label's logit (so some
    predictions are correct); rows of an ``empty`` class get their label's logit
    pushed far down (never correct). ``label`` makes every row that class
    (duplicate labels). ``n_ignored`` rows are labelled ``IGNORE``. The batch is
    redrawn until no row has a tie at the top in ``dtype``, so argmax is unambiguous.
    """
    while True:
        z = torch.randn((N, C), generator=gen, dtype=torch.float32)
        y = torch.randint(0, C, (N,), generator=gen) if label is None else torch.full((N,), label, dtype=torch.int64)
        rows = torch.arange(N)
        bumped = torch.rand(N, generator=gen) < bump_fraction
        z[rows[bumped], y[bumped]] += bump
        if suppress_empty:
            for k in empty:
                z[y == k, k] -= 10.0
        ignored = torch.randperm(N, generator=gen)[:n_ignored]
        y[ignored] = IGNORE
        wire = z.to(dtype)
        top = wire.to(torch.float64).topk(2, dim=1).values
        if bool((top[:, 0] > top[:, 1]).all()):
            return wire, y


# --------------------------------------------------------------------------------------
# Helpers


def spec(init: str, empty_class: str) -> lossd.SessionSpec:
    return lossd.SessionSpec(
        kind="online_label_smoothing", n_classes=C, smoothing=EPS, alpha=ALPHA, init=init, empty_class=empty_class
    )


def assert_state_matches(state: lossd.SessionState, ref: ReferenceOLS) -> None:
    assert state.epoch == ref.epoch
    assert state.supervise.dtype == torch.float32 and tuple(state.supervise.shape) == (C, C)
    assert state.accumulator.dtype == torch.float64 and tuple(state.accumulator.shape) == (C, C)
    assert state.counts.dtype == torch.int64 and tuple(state.counts.shape) == (C,)
    torch.testing.assert_close(state.supervise.to(torch.float64), ref.S, rtol=RTOL, atol=ATOL, msg=lambda m: f"S: {m}")
    torch.testing.assert_close(state.accumulator, ref.U, rtol=RTOL, atol=ATOL, msg=lambda m: f"U: {m}")
    assert torch.equal(state.counts, ref.count), (state.counts, ref.count)
    assert state.samples_this_epoch == ref.samples


def assert_same_state(a: lossd.SessionState, b: lossd.SessionState) -> None:
    """Byte-identical states."""
    assert a.epoch == b.epoch
    assert a.samples_this_epoch == b.samples_this_epoch
    for field in ("supervise", "accumulator", "counts"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype and x.shape == y.shape, field
        assert torch.equal(x, y), field


def check_result(
    result: lossd.LossResult,
    expected,
    *,
    epoch: int,
    dtype: torch.dtype = torch.float32,
    need_grad: bool = True,
    grad_rtol: float = RTOL,
) -> None:
    loss, grad, used, n_correct = expected
    assert result.n_used == used
    assert result.n_correct == n_correct
    assert result.epoch == epoch
    assert result.loss.dim() == 0
    torch.testing.assert_close(
        result.loss.to(torch.float64), torch.tensor(loss, dtype=torch.float64), rtol=RTOL, atol=ATOL
    )
    if not need_grad:
        assert result.grad is None
        return
    assert result.grad is not None
    assert result.grad.dtype == dtype and tuple(result.grad.shape) == (N, C)
    torch.testing.assert_close(result.grad.to(torch.float64), grad, rtol=grad_rtol, atol=ATOL)


def run_epochs(
    client: lossd.Client,
    name: str,
    ref: ReferenceOLS,
    gen: torch.Generator,
    epochs: int,
    *,
    dtype: torch.dtype = torch.float32,
    grad_rtol: float = RTOL,
) -> None:
    """Mixed train/eval batches; state checked after every epoch against ``ref``."""
    for e in range(epochs):
        empty = EMPTY_BY_EPOCH[e]
        dup_label = [k for k in range(C) if k not in empty][e % (C - len(empty))]
        # (mode, batch kwargs, need_grad)
        plan = [
            ("train", {}, True),
            ("train", {}, True),
            ("eval", {"bump_fraction": 1.0, "bump": 4.0, "suppress_empty": False}, True),
            ("train", {"label": dup_label}, True),
            ("train", {}, False),
            ("eval", {"suppress_empty": False}, False),
            ("train", {}, True),
            ("train", {}, True),
        ]
        for step, (mode, kwargs, need_grad) in enumerate(plan):
            logits, labels = make_batch(gen, empty=empty, dtype=dtype, **kwargs)
            stream = step % 2 == 0
            if mode == "train":
                result = client.compute_loss(name, logits, labels, training=True, need_grad=need_grad, stream=stream)
                expected = ref.train(logits, labels)
            else:
                before = client.get_state(name)
                info_before = client.get_session(name)
                result = client.compute_loss(name, logits, labels, training=False, need_grad=need_grad, stream=stream)
                expected = ref.eval(logits, labels)
                assert expected[3] > 0, "eval batch should have correct predictions, or it proves nothing"
                assert_same_state(client.get_state(name), before)
                info_after = client.get_session(name)
                assert info_after.samples_this_epoch == info_before.samples_this_epoch
                assert info_after.correct_this_epoch == info_before.correct_this_epoch
            check_result(result, expected, epoch=e, dtype=dtype, need_grad=need_grad, grad_rtol=grad_rtol)

        # The data really exercises the intended empty classes (and only them).
        assert ref.empty_classes() == empty
        # Mid-epoch statistics, before the update.
        assert_state_matches(client.get_state(name), ref)
        info = client.next_epoch(name, epoch=e) if e % 2 == 0 else client.next_epoch(name)
        ref.next_epoch()
        assert info.epoch == e + 1
        after = client.get_state(name)
        assert_state_matches(after, ref)
        assert not after.accumulator.any() and not after.counts.any()

        # A retried next_epoch for the finished epoch gets the same answer and changes nothing.
        assert client.next_epoch(name, epoch=e) == info
        assert_same_state(client.get_state(name), after)


# --------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("empty_class", POLICIES)
@pytest.mark.parametrize("init", INITS)
def test_ols_matches_reference_over_epochs(
    client: lossd.Client, session_name: str, init: str, empty_class: str
) -> None:
    client.create_session(session_name, spec(init, empty_class))
    ref = ReferenceOLS(C, EPS, ALPHA, init, empty_class)
    initial = client.get_state(session_name)
    assert_state_matches(initial, ref)
    torch.testing.assert_close(initial.supervise, ref.S.to(torch.float32), rtol=1e-6, atol=0.0)

    gen = torch.Generator().manual_seed(1000 + 10 * INITS.index(init) + POLICIES.index(empty_class))
    run_epochs(client, session_name, ref, gen, epochs=len(EMPTY_BY_EPOCH))


def test_empty_class_policies_give_different_soft_labels(client: lossd.Client, session_name: str) -> None:
    """Same stream, three policies: only the columns of the empty classes differ, as the policy says."""
    names = {policy: f"{session_name}-{policy}" for policy in POLICIES}
    refs = {}
    for policy, name in names.items():
        client.create_session(name, spec("label_smoothing", policy))
        refs[policy] = ReferenceOLS(C, EPS, ALPHA, "label_smoothing", policy)

    gen = torch.Generator().manual_seed(7)
    states: dict[int, dict[str, lossd.SessionState]] = {}
    for e in range(2):
        empty = EMPTY_BY_EPOCH[e]
        for _ in range(5):
            logits, labels = make_batch(gen, empty=empty)
            for policy, name in names.items():
                result = client.compute_loss(name, logits, labels)
                check_result(result, refs[policy].train(logits, labels), epoch=e)
        for policy, name in names.items():
            assert refs[policy].empty_classes() == empty
            client.next_epoch(name, epoch=e)
            refs[policy].next_epoch()
        states[e] = {policy: client.get_state(name) for policy, name in names.items()}
        for policy in POLICIES:
            assert_state_matches(states[e][policy], refs[policy])

    # Epoch 0: class C-1 was empty.
    s = {policy: states[0][policy].supervise.to(torch.float64) for policy in POLICIES}
    k = C - 1
    ls_column = torch.full((C,), EPS / (C - 1), dtype=torch.float64)
    ls_column[k] = 1.0 - EPS
    torch.testing.assert_close(s["keep"][:, k], ls_column, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(s["uniform"][:, k], torch.full((C,), 1.0 / C, dtype=torch.float64), rtol=RTOL, atol=ATOL)
    assert torch.equal(s["zero"][:, k], torch.zeros(C, dtype=torch.float64))
    for a, b in (("keep", "uniform"), ("keep", "zero"), ("uniform", "zero")):
        assert (s[a][:, k] - s[b][:, k]).abs().max() > 0.05, (a, b)
        torch.testing.assert_close(s[a][:, :k], s[b][:, :k], rtol=RTOL, atol=ATOL)

    # Epoch 1: class 1 was empty; "keep" keeps what epoch 0 learnt for it (not the init).
    s1 = {policy: states[1][policy].supervise.to(torch.float64) for policy in POLICIES}
    torch.testing.assert_close(s1["keep"][:, 1], s["keep"][:, 1], rtol=0.0, atol=0.0)
    assert (s1["keep"][:, 1] - torch.full((C,), EPS / (C - 1), dtype=torch.float64)).abs().max() > 0.05
    torch.testing.assert_close(
        s1["uniform"][:, 1], torch.full((C,), 1.0 / C, dtype=torch.float64), rtol=RTOL, atol=ATOL
    )
    assert torch.equal(s1["zero"][:, 1], torch.zeros(C, dtype=torch.float64))


@pytest.mark.parametrize(
    ("dtype", "grad_rtol"),
    [
        # The gradient comes back in the logits' dtype: float32 math, then one rounding
        # to 8 (bfloat16) or 11 (float16) significant bits, i.e. <= 2^-8 / 2^-10 relative.
        (torch.bfloat16, 2.0**-7),
        (torch.float16, 2.0**-9),
    ],
    ids=["bfloat16", "float16"],
)
def test_half_precision_logits_accumulate(
    client: lossd.Client, session_name: str, dtype: torch.dtype, grad_rtol: float
) -> None:
    """The reference module crashes on these; lossd upcasts. Compare to the reference fed the upcast values."""
    client.create_session(session_name, spec("label_smoothing", "keep"))
    ref = ReferenceOLS(C, EPS, ALPHA, "label_smoothing", "keep")
    gen = torch.Generator().manual_seed(31 if dtype == torch.bfloat16 else 37)
    run_epochs(client, session_name, ref, gen, epochs=3, dtype=dtype, grad_rtol=grad_rtol)
    # It really accumulated something and moved S away from the init.
    assert (ref.S - ReferenceOLS(C, EPS, ALPHA, "label_smoothing", "keep").S).abs().max() > 0.05


def test_next_epoch_with_a_stale_or_future_epoch_fails_and_changes_nothing(
    client: lossd.Client, session_name: str
) -> None:
    client.create_session(session_name, spec("label_smoothing", "keep"))
    ref = ReferenceOLS(C, EPS, ALPHA, "label_smoothing", "keep")
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):
        logits, labels = make_batch(gen, empty=set())
        client.compute_loss(session_name, logits, labels)
        ref.train(logits, labels)
    mid = client.get_state(session_name)
    assert mid.counts.sum() > 0
    assert_state_matches(mid, ref)

    for wrong in (1, 2, -1):
        with pytest.raises(lossd.FailedPreconditionError):
            client.next_epoch(session_name, epoch=wrong)
        assert_same_state(client.get_state(session_name), mid)
    assert client.get_session(session_name).epoch == 0

    finished = client.next_epoch(session_name, epoch=0)
    assert finished.epoch == 1
    ref.next_epoch()
    done = client.get_state(session_name)
    assert_state_matches(done, ref)
    assert not torch.equal(done.supervise, mid.supervise)

    for _ in range(2):  # retries of the finished epoch get the first answer and change nothing
        assert client.next_epoch(session_name, epoch=0) == finished
        assert_same_state(client.get_state(session_name), done)
    for wrong in (2, -1):
        with pytest.raises(lossd.FailedPreconditionError):
            client.next_epoch(session_name, epoch=wrong)
        assert_same_state(client.get_state(session_name), done)
    assert client.get_session(session_name).epoch == 1


def test_checkpoint_round_trip_continues_bit_identically(client: lossd.Client, session_name: str) -> None:
    """get_state on one session, load_state into another of the same spec: both continue identically."""
    the_spec = spec("label_smoothing", "zero")
    source, target = f"{session_name}-a", f"{session_name}-b"
    client.create_session(source, the_spec)
    client.create_session(target, the_spec)
    ref = ReferenceOLS(C, EPS, ALPHA, "label_smoothing", "zero")
    gen = torch.Generator().manual_seed(11)

    # One full epoch, then half of the next one, so U and counts are non-trivial.
    for _ in range(4):
        logits, labels = make_batch(gen, empty=EMPTY_BY_EPOCH[0])
        client.compute_loss(source, logits, labels)
        ref.train(logits, labels)
    client.next_epoch(source, epoch=0)
    ref.next_epoch()
    for _ in range(2):
        logits, labels = make_batch(gen, empty=EMPTY_BY_EPOCH[1])
        client.compute_loss(source, logits, labels)
        ref.train(logits, labels)

    checkpoint = client.get_state(source)
    assert_state_matches(checkpoint, ref)
    assert checkpoint.counts.sum() > 0 and checkpoint.accumulator.abs().sum() > 0
    assert (checkpoint.supervise[:, C - 1] == 0).all()  # the emptied class of epoch 0

    info = client.load_state(target, checkpoint)
    assert info.epoch == checkpoint.epoch == 1
    assert info.samples_this_epoch == checkpoint.samples_this_epoch
    assert info.correct_this_epoch == client.get_session(source).correct_this_epoch
    assert_same_state(client.get_state(target), checkpoint)

    for step in range(4):
        logits, labels = make_batch(gen, empty=EMPTY_BY_EPOCH[1])
        training = step != 2
        a = client.compute_loss(source, logits, labels, training=training)
        b = client.compute_loss(target, logits, labels, training=training)
        assert torch.equal(a.loss, b.loss)
        assert a.grad is not None and b.grad is not None and torch.equal(a.grad, b.grad)
        assert (a.n_used, a.n_correct, a.epoch) == (b.n_used, b.n_correct, b.epoch)
        if training:
            ref.train(logits, labels)
    assert_same_state(client.get_state(target), client.get_state(source))

    client.next_epoch(source, epoch=1)
    client.next_epoch(target, epoch=1)
    ref.next_epoch()
    a_state, b_state = client.get_state(source), client.get_state(target)
    assert_same_state(a_state, b_state)
    assert_state_matches(b_state, ref)

    logits, labels = make_batch(gen, empty=set())
    a = client.compute_loss(source, logits, labels)
    b = client.compute_loss(target, logits, labels)
    assert torch.equal(a.loss, b.loss) and torch.equal(a.grad, b.grad)
