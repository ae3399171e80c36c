"""Large vocabularies on a GPU: the device memory budget, and a bfloat16 S (docs/limits.md).

Without a GPU the device account's code path runs all the same: stores and sessions on the CPU are
given a ``device`` account, and the budget's defaults are computed from a stand-in for the device's
memory. The GPU tests make a 32000-class session with the default budgets, and send sessions through the
store and back in chunks.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

import lossd
from lossd._exceptions import ResourceExhaustedError
from lossd._kernels import KernelUnavailableError
from lossd_server import device as device_module
from lossd_server import statedb
from lossd_server.app import start
from lossd_server.batch import Batch
from lossd_server.config import GiB, Settings
from lossd_server.durable import DurableStore, open_store
from lossd_server.embedded import EmbeddedServer
from lossd_server.footprint import (
    SOFT_LABEL_DTYPES,
    Budgets,
    check_fits,
    epoch_end_bytes,
    ols_math_kernel,
    snapshot_bytes,
    state_bytes,
)
from lossd_server.memory import MemoryAccount
from lossd_server.session import Session
from lossd_server.statedb import StateDB, host_chunks
from lossd_server.store import MemoryStore
from tests._kernels import KERNEL_PARAMS, kernel_of
from tests.conftest import ols_spec

H200, H100 = 141 * 10**9, 80 * 10**9  # bytes, as the vendors count them
BIG = 32000
C = 12
ALPHA = 0.5  # ols_spec's


def _cuda_budget(total: int, monkeypatch: pytest.MonkeyPatch, request_bytes: int = 4 * GiB, **settings: int) -> int:
    """The device account's limit a server on a GPU of ``total`` bytes gets (no GPU needed)."""
    monkeypatch.setattr(device_module, "device_total_memory", lambda device: total)
    account = device_module.device_memory(Settings(**settings), torch.device("cuda"), request_bytes)
    assert account is not None and account.setting == "device_memory_bytes"
    return account.limit


# The budget ----------------------------------------------------------------------------------


def test_default_device_budget_is_80_percent_leaving_room_for_calls_in_flight(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _cuda_budget(H200, monkeypatch) == int(0.8 * H200)
    assert _cuda_budget(H100, monkeypatch) == int(0.8 * H100)
    # A 16 GiB card: 20% would not cover the 4 GiB request budget and 1 GiB for CUDA.
    assert _cuda_budget(16 * GiB, monkeypatch) == 11 * GiB
    assert _cuda_budget(4 * GiB, monkeypatch) == 0
    assert _cuda_budget(H100, monkeypatch, device_memory_bytes=20 * GiB) == 20 * GiB


def test_device_budget_past_the_device_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="device_memory_bytes=90000000000 is more than"):
        _cuda_budget(H100, monkeypatch, device_memory_bytes=90 * 10**9)


def test_device_budget_on_a_cpu_server_is_refused() -> None:
    cpu = torch.device("cpu")
    assert device_module.device_memory(Settings(), cpu, 4 * GiB) is None
    with pytest.raises(ValueError, match="device_memory_bytes=1073741824 is set but the server's device is cpu"):
        device_module.device_memory(Settings(device_memory_bytes=GiB), cpu, 4 * GiB)
    # And the server does not start with it.
    settings = Settings(port=0, device="cpu", store="memory", local_socket="", device_memory_bytes=GiB)
    with pytest.raises(ValueError, match="device_memory_bytes"):
        asyncio.run(start(settings))


def test_the_arithmetic_at_32000_classes() -> None:
    """docs/limits.md's table, and what fits where with the default budgets."""
    spec = ols_spec(BIG)
    assert state_bytes(spec) == 12_288_256_000  # S 4.10 GB + accumulator 8.19 GB + counts 256 KB
    assert state_bytes(spec, torch.bfloat16) == 10_240_256_000  # S 2.05 GB
    assert epoch_end_bytes(spec) == 12_288_000_000
    assert snapshot_bytes(spec) == 8_192_256_000
    host = (
        MemoryAccount("state", 4 * GiB, "matrix_memory_bytes"),
        MemoryAccount("request", 4 * GiB, "request_memory_bytes"),
    )
    # A CPU server with the defaults refuses it: its epoch end could never fit the request budget.
    with pytest.raises(ResourceExhaustedError, match=r"12288000000 bytes of request memory .* request_memory_bytes="):
        check_fits("big", spec, Budgets(*host), torch.float32)
    for total in (H200, H100):
        device = MemoryAccount("device", int(0.8 * total), "device_memory_bytes")
        for dtype in (torch.float32, torch.bfloat16):
            assert check_fits("big", spec, Budgets(*host, device), dtype) == state_bytes(spec, dtype)
    # A budget that holds the bfloat16 session and its epoch end (22.5 GB) but not the float32 one (24.6 GB).
    device = MemoryAccount("device", 23 * 10**9, "device_memory_bytes")
    assert check_fits("big", spec, Budgets(*host, device), torch.bfloat16) == 10_240_256_000
    with pytest.raises(ResourceExhaustedError, match=r"24576256000 bytes of device memory .*device_memory_bytes="):
        check_fits("big", spec, Budgets(*host, device), torch.float32)


# The device account's code path, on the CPU ------------------------------------------------------


def _batch(seed: int, n: int = 64, c: int = C, boost: float = 2.0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=generator)
    logits = torch.randn(n, c, generator=generator)
    logits[torch.arange(n), labels] += boost  # most rows correct, so the accumulator fills
    return Batch(logits, labels)


def test_a_device_account_pays_for_matrices_epoch_ends_and_snapshots(tmp_path: Path) -> None:
    spec = ols_spec(200)
    held, transient = state_bytes(spec), max(epoch_end_bytes(spec), snapshot_bytes(spec))
    # Host budgets too small for the session's epoch end or snapshot: on a CPU server it would be refused.
    work = MemoryAccount("request", 64 << 10, "request_memory_bytes")
    device = MemoryAccount("device", held + transient, "device_memory_bytes")
    store = DurableStore(
        tmp_path, device=torch.device("cpu"), max_sessions=8, matrix_memory_bytes=4 << 20, work_memory=work,
        device_memory=device, idle_ttl_seconds=0, snapshot_seconds=3600,
    )  # fmt: skip
    try:
        with pytest.raises(ResourceExhaustedError, match="request memory"):
            check_fits("run", spec, Budgets(store.memory, work), torch.float32)  # as a CPU server would
        session, created = store.create("", "run", spec)
        assert created and device.used == held and store.memory.used == 0
        session.compute(_batch(0, c=200), training=True, need_grad=True)
        store.snapshot_all()  # the staging copy, on the session's device
        assert device.peak == held + snapshot_bytes(spec) and device.used == held
        session.arrive(0, None).result(timeout=10)  # the epoch end
        assert device.peak == held + epoch_end_bytes(spec) and device.used == held
        assert work.peak == 0  # the host's request budget paid for none of it
        assert store.memory.used == 0  # nor did the host's state budget
        with pytest.raises(ResourceExhaustedError, match=r"needs 481600 bytes of matrices .*device_memory_bytes="):
            store.create("", "second", spec)  # it would fit alone, but not beside the first
        too_big = ols_spec(300)
        with pytest.raises(ResourceExhaustedError, match=r"of device memory to hold its matrices and finish an epoch"):
            store.create("", "too-big", too_big)
        store.delete("", "run")
        assert device.used == 0
    finally:
        store.close()


def test_a_session_is_refused_that_would_leave_no_room_for_another_s_epoch_end() -> None:
    big, small = ols_spec(200), ols_spec(10)
    # Room for the big session, its epoch end, and less than the small session's 1280 bytes more.
    device = MemoryAccount("device", state_bytes(big) + epoch_end_bytes(big) + 1000, "device_memory_bytes")
    store = MemoryStore(device=torch.device("cpu"), max_sessions=8, matrix_memory_bytes=1 << 20, device_memory=device)
    session, _ = store.create("", "big", big)
    assert device.limit - device.used >= state_bytes(small)  # its matrices alone would fit
    with pytest.raises(ResourceExhaustedError, match=r"hold 481600 and their epoch ends need 480000 more"):
        store.create("", "small", small)
    session.compute(_batch(4, c=200), training=True, need_grad=True)
    session.arrive(0, None).result(timeout=10)  # which admitting the small one would have made impossible
    assert session.epoch == 1


def test_a_session_loaded_from_the_store_is_charged_to_the_device_account(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(statedb, "_CHUNK", 48)  # many chunks, the last one partial: 2500 floats in 12s
    spec = ols_spec(50)
    first = DurableStore(tmp_path, device=torch.device("cpu"), max_sessions=8, matrix_memory_bytes=4 << 20)
    session, _ = first.create("", "run", spec)
    session.compute(_batch(1, c=50), training=True, need_grad=True)
    session.arrive(0, None).result(timeout=10)  # a stored S, which the load reads into bfloat16
    session.compute(_batch(2, c=50), training=True, need_grad=True)
    before = session.snapshot()
    first.close()
    device = MemoryAccount("device", 1 << 20, "device_memory_bytes")
    store = open_store(
        Settings(store="sqlite", state_dir=tmp_path, soft_label_dtype="bfloat16"), torch.device("cpu"), None, device
    )
    try:
        assert device.used == state_bytes(spec, torch.bfloat16)  # loaded at start-up, S held in bfloat16
        after = store.get("", "run").snapshot()
        assert torch.equal(after.accumulator, before.accumulator) and torch.equal(after.counts, before.counts)
        assert torch.equal(after.soft_labels, before.soft_labels.bfloat16().float())
    finally:
        store.close()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.int64])
def test_host_chunks_copy_out_every_byte_once(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """The chunks a GPU tensor is written to the store in (copy_out=True), checked on the CPU."""
    monkeypatch.setattr(statedb, "_CHUNK", 40)
    tensor = (torch.arange(7 * 9) * 3).to(dtype).reshape(7, 9)
    whole = bytes(statedb.byte_view(tensor))
    for copy_out in (False, True):
        chunks = [bytes(chunk) for chunk in host_chunks(tensor, copy_out=copy_out)]
        assert b"".join(chunks) == whole and max(map(len, chunks)) <= 40


# A bfloat16 S ----------------------------------------------------------------------------------


def _ols_reference(logits: torch.Tensor, labels: torch.Tensor, soft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, gradient) of OLS in float64 from the formula: alpha CE + (1 - alpha) CE against S's row y."""
    x = logits.double().requires_grad_()
    target = ALPHA * torch.nn.functional.one_hot(labels, soft.shape[0]).double() + (1 - ALPHA) * soft.double()[labels]
    loss = -(target * torch.log_softmax(x, dim=1)).sum(dim=1).mean()
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


@pytest.mark.parametrize("kernel", ["eager", "auto", *KERNEL_PARAMS[2:]])  # and "triton", interpreted
def test_bfloat16_soft_labels_match_a_float64_rederivation(kernel: str) -> None:
    """Through the eager math (what "auto" is on the CPU) and CUDA's Triton kernel, interpreted on the CPU."""
    math_kernel: Any = kernel_of(kernel)
    session = Session("bf16", ols_spec(C), torch.device("cpu"), math_kernel=math_kernel, soft_dtype=torch.bfloat16)
    assert session.state_bytes == 10 * C * C + 8 * C
    for epoch in range(3):
        _, soft = session.soft_labels()
        assert soft.dtype == torch.float32 and torch.equal(soft, soft.bfloat16().float())
        probs64 = []
        for step in range(3):
            batch = _batch(10 * epoch + step)
            result = session.compute(batch, training=True, need_grad=True)
            assert (result.output.fused is None) == (kernel != "triton")  # on the CPU: the eager math
            loss, grad = _ols_reference(batch.logits, batch.labels, soft)
            # The loss math runs in float32 on the bfloat16 entries, exactly widened.
            torch.testing.assert_close(result.output.loss.double(), loss, rtol=1e-6, atol=1e-7)
            assert result.output.grad is not None
            torch.testing.assert_close(result.output.grad.double(), grad, rtol=1e-5, atol=1e-7)
            correct = batch.logits.argmax(dim=1) == batch.labels
            probs64.append((batch.labels[correct], torch.softmax(batch.logits.double()[correct], dim=1)))
        state = session.snapshot()
        session.arrive(0, None).result(timeout=10)
        _, new = session.soft_labels()
        # Exactly the float32 S the accumulator gives (empty classes keep theirs), rounded once to bfloat16.
        averaged = (state.accumulator / state.counts.clamp(min=1).double().unsqueeze(1)).float()
        expected = torch.where((state.counts == 0).unsqueeze(1), soft, averaged).bfloat16().float()
        assert torch.equal(new, expected)
        # And a float64 re-derivation from the logits, to bfloat16's 8 bits (half an ulp: 2^-9 relative).
        acc64 = torch.zeros(C, C, dtype=torch.float64)
        counts = torch.zeros(C, dtype=torch.int64)
        for rows, probs in probs64:
            acc64.index_add_(0, rows, probs)
            counts.index_add_(0, rows, torch.ones_like(rows))
        assert torch.equal(counts, state.counts)
        s64 = torch.where((counts == 0).unsqueeze(1), soft.double(), acc64 / counts.clamp(min=1).unsqueeze(1))
        torch.testing.assert_close(new.double(), s64, rtol=2**-8, atol=1e-12)
        assert not torch.equal(new, s64.float())  # bfloat16 did round: the float32 S differs


def test_a_bfloat16_s_on_the_cpu_runs_the_eager_math() -> None:
    """numba reads S as float32: a bfloat16 S would be widened whole at every call, so the eager math runs."""
    cpu, cuda, bf16 = torch.device("cpu"), torch.device("cuda"), torch.bfloat16
    assert ols_math_kernel("auto", bf16, cpu) == "eager" and ols_math_kernel("eager", bf16, cpu) == "eager"
    assert ols_math_kernel("fused", bf16, cuda) == "fused" and ols_math_kernel("auto", bf16, cuda) == "auto"
    assert ols_math_kernel("fused", torch.float32, cpu) == "fused"
    with pytest.raises(KernelUnavailableError, match="soft_label_dtype=bfloat16 on the CPU"):
        ols_math_kernel("fused", bf16, cpu)
    settings = Settings(port=0, device="cpu", store="memory", local_socket="", soft_label_dtype="bfloat16")
    with pytest.raises(ValueError, match="math_kernel='fused' with soft_label_dtype=bfloat16"):
        asyncio.run(start(settings.model_copy(update={"math_kernel": "fused"})))
    assert Session("ols", ols_spec(C), cpu, math_kernel="auto", soft_dtype=bf16).math_kernel == "eager"
    ce = lossd.SessionSpec(kind="cross_entropy", n_classes=C)
    assert Session("ce", ce, cpu, math_kernel="auto", soft_dtype=bf16).math_kernel == "auto"  # it reads no S


def test_wire_and_store_stay_float32_with_a_bfloat16_s(tmp_path: Path) -> None:
    spec = ols_spec(C)
    settings = Settings(
        port=0, device="cpu", store="sqlite", state_dir=tmp_path, local_socket="", soft_label_dtype="bfloat16"
    )
    with EmbeddedServer(settings) as server, lossd.Client(server.target) as client:
        info, _ = client.create_session("run", spec)
        assert info.state_bytes == 10 * C * C + 8 * C
        for step in range(3):
            batch = _batch(step)
            client.compute_loss("run", batch.logits, batch.labels)
        client.next_epoch("run")
        epoch, soft = client.get_soft_labels("run")
        state = client.get_state("run")
        assert soft.dtype == state.supervise.dtype == torch.float32 and torch.equal(soft, state.supervise)
        assert torch.equal(soft, soft.bfloat16().float())  # held in bfloat16, widened on the way out
        db = StateDB(tmp_path)  # read beside the server: WAL lets a second connection see the commit
        try:
            stored = db.soft_labels_at("", "run", epoch, C)
        finally:
            db.close()
        assert stored is not None and stored.dtype == torch.float32 and torch.equal(stored.T, soft)
        # LoadState of a float32 S: held rounded, and stored as held.
        fine = torch.full((C, C), 1.0 / 3.0)
        client.load_state("run", lossd.SessionState(epoch + 1, fine, state.accumulator, state.counts, 0))
        _, loaded = client.get_soft_labels("run")
        assert torch.equal(loaded, fine.bfloat16().float()) and not torch.equal(loaded, fine)
    for dtype in ("bfloat16", "float32"):  # a restart reads the float32 store into either
        settings = Settings(
            port=0, device="cpu", store="sqlite", state_dir=tmp_path, local_socket="", soft_label_dtype=dtype
        )
        with EmbeddedServer(settings) as server, lossd.Client(server.target) as client:
            assert torch.equal(client.get_soft_labels("run")[1], loaded)


# On a GPU ----------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_32000_class_session_fits_a_gpu_with_the_default_budgets(tmp_path: Path, dtype: str) -> None:
    """Needs a device of at least ~31 GB (an H100 or H200): the default budget is 80% of it."""
    total = device_module.device_total_memory(torch.device("cuda"))
    spec = ols_spec(BIG)
    held = state_bytes(spec, SOFT_LABEL_DTYPES[dtype])
    needed = held + epoch_end_bytes(spec)
    if needed > device_module.default_device_memory_bytes(total, 4 * GiB):
        pytest.skip(f"{total} bytes of GPU memory: the default budget cannot hold {needed}")
    torch.cuda.reset_peak_memory_stats()
    settings = Settings(
        port=0, device="cuda", store="sqlite", state_dir=tmp_path, local_socket="", soft_label_dtype=dtype
    )
    with EmbeddedServer(settings) as server, lossd.Client(server.target, barrier_timeout=300) as client:
        info, created = client.create_session("big", spec)
        assert created and info.state_bytes == held
        generator = torch.Generator().manual_seed(0)
        labels = torch.randint(0, BIG, (64,), generator=generator)
        logits = torch.randn(64, BIG, generator=generator)
        logits[torch.arange(64), labels] += 20.0  # every row correct
        result = client.compute_loss("big", logits, labels)
        assert result.n_correct == 64 and torch.isfinite(result.loss).all()
        client.next_epoch("big")  # the epoch end, and S written to the store from the device in chunks
        assert client.get_session("big").epoch == 1
        client.delete_session("big")  # no 8 GB final snapshot at shutdown
    # What the server allocated on the device stayed within what its budget charged for.
    assert torch.cuda.max_memory_allocated() <= needed + 256 * 2**20


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gpu_sessions_round_trip_through_the_store_in_chunks(tmp_path: Path, dtype: str) -> None:
    """Snapshots staged on the GPU and written out in chunks, then read back into the GPU in chunks:
    at C = 2000 the accumulator is 4 chunks, S 2 (float32 in the store, 8 MiB chunks)."""
    c = 2000
    settings = Settings(
        port=0, device="cuda", store="sqlite", state_dir=tmp_path, local_socket="", soft_label_dtype=dtype
    )
    with EmbeddedServer(settings) as server, lossd.Client(server.target) as client:
        client.create_session("run", ols_spec(c))
        for step in range(2):
            batch = _batch(step, n=256, c=c, boost=8.0)
            client.compute_loss("run", batch.logits, batch.labels)
            if step == 0:
                client.next_epoch("run")
        before = client.get_state("run")
    with EmbeddedServer(settings) as server, lossd.Client(server.target) as client:  # the final snapshot, read back
        after = client.get_state("run")
    assert after.epoch == before.epoch == 1 and after.samples_this_epoch == before.samples_this_epoch == 256
    assert torch.equal(after.counts, before.counts) and before.counts.sum() > 0
    assert torch.equal(after.accumulator, before.accumulator)
    assert torch.equal(after.supervise, before.supervise) and after.supervise.dtype == torch.float32
    assert torch.equal(before.supervise, before.supervise.bfloat16().float()) == (dtype == "bfloat16")
