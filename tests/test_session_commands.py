"""``lossd sessions``, ``lossd export`` and ``lossd import`` against a real server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import lossd
from lossd.v1 import loss_service_pb2 as pb
from lossd_server.cli import main
from lossd_server.config import Settings
from lossd_server.embedded import EmbeddedServer
from lossd_server.soft_label_view import confused_pairs, heatmap_png
from tests.conftest import ols_spec

C = 6


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def trained(client: lossd.Client, name: str) -> lossd.SessionState:
    """An OLS session one epoch in, with statistics in the accumulator: every tensor non-trivial."""
    client.create_session(name, ols_spec(C))
    generator = torch.Generator().manual_seed(7)
    for epoch in range(2):
        labels = torch.arange(24) % C
        logits = torch.randn(24, C, generator=generator) + 3.0 * torch.nn.functional.one_hot(labels, C)
        client.compute_loss(name, logits, labels, training=True)
        if epoch == 0:
            client.next_epoch(name)
    return client.get_state(name)


def assert_same_state(actual: lossd.SessionState, expected: lossd.SessionState) -> None:
    assert (actual.epoch, actual.samples_this_epoch) == (expected.epoch, expected.samples_this_epoch)
    for field in ("supervise", "accumulator", "counts"):
        a, e = getattr(actual, field), getattr(expected, field)
        assert a.dtype == e.dtype and torch.equal(a, e), field


def test_sessions_lists_every_session_with_its_columns(
    capsys: pytest.CaptureFixture[str], server: EmbeddedServer, client: lossd.Client, session_name: str
) -> None:
    trained(client, session_name)
    client.create_session(f"{session_name}-ls", lossd.SessionSpec(kind="label_smoothing", n_classes=10))
    status, out, err = run(capsys, "sessions", "--target", server.target)
    assert status == 0 and err == ""
    header, *lines = out.splitlines()
    assert header.split() == ["NAME", "KIND", "C", "EPOCH", "WORLD", "SAMPLES", "OWNER", "LAST", "ACTIVITY"]
    rows = {line.split()[0]: line.split() for line in lines}
    assert rows[session_name][1:7] == ["online_label_smoothing", str(C), "1", "1", "24", "-"]
    assert rows[f"{session_name}-ls"][1:7] == ["label_smoothing", "10", "0", "1", "0", "-"]
    assert rows[session_name][-1] == "ago"
    assert client.get_session(session_name).owner == ""  # anonymous server: no tenant


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_export_then_import_restores_the_state_bit_for_bit(
    capsys: pytest.CaptureFixture[str],
    server: EmbeddedServer,
    client: lossd.Client,
    session_name: str,
    tmp_path: Path,
    suffix: str,
) -> None:
    expected = trained(client, session_name)
    file = tmp_path / f"state{suffix}"
    status, out, err = run(capsys, "export", session_name, str(file), "--target", server.target)
    assert status == 0 and err == "" and "epoch 1" in out
    # Into a new session (created with the file's spec) and back into the original name after a delete.
    copy = f"{session_name}-copy"
    assert run(capsys, "import", copy, str(file), "--target", server.target)[0] == 0
    assert_same_state(client.get_state(copy), expected)
    assert client.get_session(copy).spec == client.get_session(session_name).spec
    client.delete_session(session_name)
    assert run(capsys, "import", str(file), "--target", server.target)[0] == 0  # the name in the file
    assert_same_state(client.get_state(session_name), expected)


def test_errors_are_one_line_with_a_non_zero_status(
    capsys: pytest.CaptureFixture[str], server: EmbeddedServer, client: lossd.Client, session_name: str, tmp_path: Path
) -> None:
    cases = [
        (("show", "no-such-session", "--target", server.target), "not found"),
        (("export", "no-such-session", str(tmp_path / "x.npz"), "--target", server.target), "not found"),
        (("sessions", "--target", "127.0.0.1:1", "--timeout", "2"), ""),
        (("export", session_name, str(tmp_path / "x.txt"), "--target", server.target), ".npz or .safetensors"),
        (("import", "x", str(tmp_path / "missing.npz"), "--target", server.target), "no such file"),
    ]
    client.create_session(session_name, ols_spec(C))
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    cases.append((("import", "x", str(tmp_path / "other.npz"), "--target", server.target), "not a lossd"))
    for argv, expected in cases:
        status, out, err = run(capsys, *argv)
        assert status == 1 and out == "", argv
        assert err.count("\n") == 1 and err.startswith(f"lossd {argv[0]}: "), err
        assert expected.lower() in err.lower(), err
        assert "Traceback" not in err


def test_import_into_a_session_of_another_spec_is_refused_and_changes_nothing(
    capsys: pytest.CaptureFixture[str], server: EmbeddedServer, client: lossd.Client, session_name: str, tmp_path: Path
) -> None:
    trained(client, session_name)
    file = tmp_path / "state.npz"
    assert run(capsys, "export", session_name, str(file), "--target", server.target)[0] == 0
    other = f"{session_name}-other"
    client.create_session(other, ols_spec(C + 1))
    before = client.get_state(other)
    status, _, err = run(capsys, "import", other, str(file), "--target", server.target)
    assert status == 1 and err.startswith("lossd import: ")
    assert_same_state(client.get_state(other), before)


def test_show_lists_the_most_confused_pairs_and_draws_s(
    capsys: pytest.CaptureFixture[str], server: EmbeddedServer, client: lossd.Client, session_name: str, tmp_path: Path
) -> None:
    state = trained(client, session_name)
    png = tmp_path / "s.png"
    status, out, err = run(capsys, "show", session_name, "--png", str(png), "--top", "3", "--target", server.target)
    assert status == 0 and err == ""
    s = state.supervise.to(torch.float64)
    off = s - torch.diag(s.diagonal())
    expected = sorted(((float(off[j, k]), k, j) for j in range(C) for k in range(C) if j != k), reverse=True)[:3]
    lines = out.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("TRUE k")))
    listed = [line.split() for line in lines[start + 1 : start + 4]]
    assert [(int(k), int(j)) for k, j, _ in listed] == [(k, j) for _, k, j in expected]
    assert [float(v) for _, _, v in listed] == [round(v, 4) for v, _, _ in expected]
    assert f"epoch {state.epoch}" in lines[0] and f"mean {float(s.diagonal().mean()):.4f}" in out
    # A real PNG, and the heatmap drawn is S itself (the artist's data), not a resampled copy.
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(png).ndim == 3
    image = heatmap_png(state.supervise, tmp_path / "again.png", "S")
    assert np.array_equal(np.asarray(image.get_array()), state.supervise.to(torch.float64).numpy())


def test_show_of_a_stateless_session_says_so(
    capsys: pytest.CaptureFixture[str], server: EmbeddedServer, client: lossd.Client, session_name: str
) -> None:
    client.create_session(session_name, lossd.SessionSpec(kind="cross_entropy", n_classes=4))
    status, out, _ = run(capsys, "show", session_name, "--target", server.target)
    assert status == 0 and "keeps no soft labels" in out


def test_confused_pairs_orders_by_mass_and_skips_the_diagonal_and_zeros() -> None:
    s = torch.tensor([[0.9, 0.3, 0.0], [0.1, 0.7, 0.0], [0.0, 0.0, 1.0]])
    pairs = confused_pairs(s, top=10)
    assert [(p.true_class, p.other_class) for p in pairs] == [(1, 0), (0, 1)]
    assert [p.mass for p in pairs] == pytest.approx([0.3, 0.1])


def test_show_reads_a_kept_past_epoch_and_the_diagonal_over_the_epochs(
    capsys: pytest.CaptureFixture[str], server: EmbeddedServer, client: lossd.Client, session_name: str, tmp_path: Path
) -> None:
    """The shared server keeps its sessions in SQLite, with the S of past epochs."""
    client.create_session(session_name, ols_spec(C))
    generator = torch.Generator().manual_seed(11)
    kept = {0: client.get_state(session_name).supervise}
    for epoch in range(3):
        labels = torch.arange(30) % C
        logits = torch.randn(30, C, generator=generator) + (1.0 + epoch) * torch.nn.functional.one_hot(labels, C)
        client.compute_loss(session_name, logits, labels, training=True)
        client.next_epoch(session_name)
        kept[epoch + 1] = client.get_state(session_name).supervise
    epochs, diagonals = client.get_soft_label_history(session_name)
    assert epochs[-1] == 3 and set(epochs) <= set(kept) and {1, 2, 3} <= set(epochs)
    for epoch, diagonal in zip(epochs, diagonals, strict=True):
        assert torch.equal(diagonal, kept[epoch].diagonal())
    assert torch.equal(client.get_soft_labels(session_name, 1)[1], kept[1])

    png = tmp_path / "s.png"
    status, out, err = run(capsys, "show", session_name, "--epoch", "1", "--png", str(png), "--target", server.target)
    assert status == 0 and err == ""
    assert "epoch 1 (the session is at epoch 3)" in out.splitlines()[0]
    assert f"mean {float(kept[1].diagonal().mean()):.4f}" in out
    lines = out.splitlines()
    table = lines[lines.index("the diagonal of S over the epochs the server keeps:") + 2 :]
    means = {int(line.split()[0]): line.split()[1] for line in table if line.split() and line.split()[0].isdigit()}
    assert means == {epoch: f"{float(kept[epoch].diagonal().mean()):.4f}" for epoch in epochs}
    assert (tmp_path / "s_diagonal.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    status, _, err = run(capsys, "show", session_name, "--epoch", "7", "--target", server.target)
    assert status == 1 and "keeps no soft labels of epoch 7" in err and err.count("\n") == 1


def test_a_memory_store_keeps_only_the_current_epoch(session_name: str) -> None:
    settings = Settings(host="127.0.0.1", port=0, store="memory", grace_seconds=1)
    with EmbeddedServer(settings) as memory, lossd.Client(memory.target) as client:
        client.create_session(session_name, ols_spec(C))
        client.next_epoch(session_name)
        epochs, diagonals = client.get_soft_label_history(session_name)
        assert epochs == [1] and diagonals.shape == (1, C)
        with pytest.raises(lossd.NotFoundError, match="keeps no soft labels of epoch 0"):
            client.get_soft_labels(session_name, 0)
        with pytest.raises(lossd.InvalidArgumentError, match="epoch"):
            client._call(client._stub.GetState, pb.GetStateRequest(session=session_name, epoch=0))
