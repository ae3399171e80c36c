"""OLS shared by real torch.distributed ranks: separate processes in a gloo group, one named session.

Each worker (tests/distributed_worker.py) gets RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT
as torchrun would set them, and creates its module without world_size / rank. The OLS
statistics do not depend on S, so S after every epoch is a function of the union of that
epoch's training batches over all ranks, whatever the interleaving: this test rebuilds
that union in one process and compares with the float64 ``ReferenceOLS``.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import distributed_worker as worker
import pytest
import torch
from test_ols_epochs import ReferenceOLS

import lossd
from lossd_server.embedded import EmbeddedServer

EPOCHS = 3
WORKER = Path(worker.__file__)
DEADLINE = 60.0  # seconds for the whole group; a healthy run takes a few

# S is an average of float32 softmax rows (a few ulp each), stored in float32: 1e-6 is
# > 10x that. The order in which ranks' batches were summed changes only float64 roundings.
S_ATOL = 1e-6
# The accumulator sums up to ~100 float32 probabilities per entry.
U_RTOL, U_ATOL = 1e-5, 1e-6


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tail(path: Path, chars: int = 3000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:]


def run_workers(tmp_path: Path, world_size: int, target: str, session: str, seed: int) -> list[dict]:
    """Start ``world_size`` ranks, wait for all; on a failure or timeout kill the rest and report."""
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[tuple[Path, Path]] = []
    try:
        for rank in range(world_size):
            env = dict(
                os.environ,
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world_size),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
            args = [sys.executable, str(WORKER), "--target", target, "--session", session, "--seed", str(seed)]
            args += ["--epochs", str(EPOCHS), "--out", str(tmp_path / f"rank{rank}.json")]
            out, err = tmp_path / f"rank{rank}.stdout", tmp_path / f"rank{rank}.stderr"
            logs.append((out, err))
            with out.open("wb") as stdout, err.open("wb") as stderr:
                procs.append(subprocess.Popen(args, env=env, stdout=stdout, stderr=stderr))
        deadline = time.monotonic() + DEADLINE
        failure = None
        while any(p.poll() is None for p in procs):
            failed = [r for r, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed:
                failure = f"ranks {failed} failed"
                break
            if time.monotonic() > deadline:
                failure = f"timed out after {DEADLINE} s"
                break
            time.sleep(0.05)
        else:
            failed = [r for r, p in enumerate(procs) if p.returncode != 0]
            failure = f"ranks {failed} failed" if failed else None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    if failure is not None:
        report = "\n".join(
            f"--- rank {r} (exit {p.returncode})\nstdout:\n{tail(out)}\nstderr:\n{tail(err)}"
            for r, (p, (out, err)) in enumerate(zip(procs, logs, strict=True))
        )
        pytest.fail(f"{failure}\n{report}")
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(world_size)]


def reference_by_epoch(world_size: int, seed: int) -> tuple[list[torch.Tensor], ReferenceOLS, ReferenceOLS]:
    """(S at the start of every epoch, the reference just before the last next_epoch, the one after)."""
    ref = ReferenceOLS(worker.C, worker.EPS, worker.ALPHA, "label_smoothing", "keep", ignore_index=worker.IGNORE)
    supervise = []
    for epoch in range(EPOCHS):
        supervise.append(ref.S.clone())
        for rank in range(world_size):
            for step, (mode, size) in enumerate(worker.plan(epoch, rank)):
                if mode == "train":
                    ref.train(*worker.make_batch(seed, epoch, rank, step, size))
        before_last = copy.deepcopy(ref)
        ref.next_epoch()
    return supervise, before_last, ref


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_of_a_gloo_group_share_one_ols_session(
    server: EmbeddedServer, session_name: str, tmp_path: Path, world_size: int
) -> None:
    seed = 7 + world_size
    results = run_workers(tmp_path, world_size, server.target, session_name, seed)
    supervise, before_last, ref = reference_by_epoch(world_size, seed)

    for rank, result in enumerate(results):
        assert (result["rank"], result["world_size"]) == (rank, world_size)
        assert result["epochs_seen"] == [[e, e + 1] for e in range(EPOCHS)]
        assert result["max_loss_error"] <= worker.LOSS_ATOL and result["max_grad_error"] <= worker.GRAD_ATOL, result
        for epoch in range(EPOCHS):
            seen = torch.tensor(result["supervise"][epoch], dtype=torch.float64)
            # Every rank trained epoch e on the one S published from the union of epoch e-1.
            assert torch.equal(seen, torch.tensor(results[0]["supervise"][epoch], dtype=torch.float64))
            torch.testing.assert_close(
                seen, supervise[epoch], rtol=0.0, atol=S_ATOL, msg=lambda m, e=epoch: f"S at epoch {e}: {m}"
            )

    # The last epoch's statistics, recorded by rank 0 once every rank had trained: exact counts.
    last = results[0]["last_epoch"]
    assert last["epoch"] == EPOCHS - 1
    assert last["samples_this_epoch"] == last["state_samples_this_epoch"] == before_last.samples
    assert before_last.samples == sum(r["trained"][-1][0] for r in results)
    assert last["correct_this_epoch"] == int(before_last.count.sum()) == sum(r["trained"][-1][1] for r in results)
    assert last["counts"] == before_last.count.tolist()
    accumulator = torch.tensor(last["accumulator"], dtype=torch.float64)
    torch.testing.assert_close(accumulator, before_last.U, rtol=U_RTOL, atol=U_ATOL)

    with lossd.Client(server.target) as client:
        info = client.get_session(session_name)
        state = client.get_state(session_name)
    assert info.spec.world_size == world_size
    assert info.epoch == state.epoch == EPOCHS and info.ranks_finished == ()
    assert state.samples_this_epoch == 0 and not state.counts.any() and not state.accumulator.any()
    torch.testing.assert_close(state.supervise.to(torch.float64), ref.S, rtol=0.0, atol=S_ATOL)
    # The data makes OLS learn something, far beyond the tolerance.
    assert (ref.S - supervise[0]).abs().max() > 0.05
    assert (state.supervise.to(torch.float64) - supervise[0]).abs().max() > 0.05
