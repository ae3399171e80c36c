"""``lossd sessions``, ``show``, ``export`` and ``import``: a running server's sessions from the shell.

Each command is a thin layer over :class:`lossd.Client`. Every failure (an unknown
session, an unreachable server, a bad file) prints one line to stderr and exits 1;
no traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from lossd import Client, LossdError, NotFoundError
from lossd._config import DEFAULT_TARGET
from lossd._statefile import StateFileError, read, write
from lossd_server.soft_label_view import confused_pairs, diagonal_png, heatmap_png

Command = Callable[[argparse.Namespace], int]


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> dict[str, Command]:
    """Add the session commands to the ``lossd`` parser; returns name -> handler."""
    sessions = commands.add_parser("sessions", help="list the sessions on a server")
    export = commands.add_parser("export", help="write a session's spec and OLS state to a .npz or .safetensors file")
    export.add_argument("session")
    export.add_argument("file", type=Path)
    show = commands.add_parser("show", help="a session's soft labels: the most confused class pairs, a heatmap")
    show.add_argument("session")
    show.add_argument("--epoch", type=int, help="the S of this past epoch, if the server keeps it (default: current)")
    show.add_argument(
        "--png",
        type=Path,
        help="also draw S as a heatmap into this PNG file, and the diagonal over the kept epochs "
        "into FILE_diagonal.png (needs matplotlib)",
    )
    show.add_argument("--top", type=int, default=10, help="how many confused pairs to list (default 10)")
    load = commands.add_parser("import", help="load a file written by `lossd export` into a session")
    load.add_argument("session", nargs="?", help="the session to load into (default: the name in the file)")
    load.add_argument("file", type=Path)
    for parser in (sessions, show, export, load):
        # None: lossd.Client reads LOSSD_TARGET / LOSSD_TOKEN itself, as every other client does.
        parser.add_argument("--target", help=f"server address [env LOSSD_TARGET, else {DEFAULT_TARGET}]")
        parser.add_argument("--token", help="bearer token [env LOSSD_TOKEN]")
        parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call (default 10)")
    handlers = (("sessions", list_sessions), ("show", show_session), ("export", export_state), ("import", import_state))
    return {name: _guarded(handler) for name, handler in handlers}


def _guarded(command: Command) -> Command:
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except (LossdError, StateFileError, OSError) as error:
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            print(f"lossd {args.command}: {message}", file=sys.stderr)
            return 1

    return run


def _client(args: argparse.Namespace) -> Client:
    # No retries: a command line should say at once that the server is not there.
    return Client(args.target, token=args.token, timeout=args.timeout, retry_deadline=0)


def list_sessions(args: argparse.Namespace) -> int:
    with _client(args) as client:
        infos = sorted(client.list_sessions(), key=lambda info: info.name)
    now = time.time()
    rows = [
        (
            info.name,
            info.spec.kind,
            str(info.spec.n_classes),
            str(info.epoch),
            str(info.spec.world_size or 1),
            str(info.samples_this_epoch),
            info.owner or "-",
            _ago(now - info.updated_at),
        )
        for info in infos
    ]
    print(_table(("NAME", "KIND", "C", "EPOCH", "WORLD", "SAMPLES", "OWNER", "LAST ACTIVITY"), rows))
    return 0


def show_session(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.get_session(args.session)
        if info.spec.kind != "online_label_smoothing":
            print(f"{args.session}: a {info.spec.kind} session, C={info.spec.n_classes}; it keeps no soft labels")
            return 0
        epoch, supervise = client.get_soft_labels(args.session, args.epoch)
        epochs, diagonals = client.get_soft_label_history(args.session)
    diagonal = supervise.diagonal()
    current = "" if epoch == info.epoch else f" (the session is at epoch {info.epoch})"
    spec = info.spec
    print(f"{args.session}: online_label_smoothing, C={spec.n_classes}, alpha={spec.alpha}, epoch {epoch}{current}")
    print(
        f"soft label on the true class (diagonal of S): mean {float(diagonal.mean()):.4f}, "
        f"min {float(diagonal.min()):.4f} (class {int(diagonal.argmin())}), max {float(diagonal.max()):.4f}"
    )
    pairs = confused_pairs(supervise, args.top)
    print("most confused class pairs (S[j, k]: the share of class k's soft label on class j):")
    rows = [(str(pair.true_class), str(pair.other_class), f"{pair.mass:.4f}") for pair in pairs]
    print(_table(("TRUE k", "OTHER j", "S[j, k]"), rows) if rows else "  none: every soft label is one-hot")
    if len(epochs) > 1:
        print("the diagonal of S over the epochs the server keeps:")
        history = [
            (str(e), f"{float(d.mean()):.4f}", f"{float(d.min()):.4f}", str(int(d.argmin())))
            for e, d in zip(epochs, diagonals, strict=True)
        ]
        print(_table(("EPOCH", "MEAN", "MIN", "MIN CLASS"), history))
    if args.png is not None:
        heatmap_png(supervise, args.png, f"{args.session}: S at epoch {epoch}")
        print(f"heatmap written to {args.png}")
        if len(epochs) > 1:
            path = args.png.with_name(f"{args.png.stem}_diagonal.png")
            diagonal_png(epochs, diagonals, path, f"{args.session}: soft label on the true class")
            print(f"diagonal over epochs written to {path}")
    return 0


def export_state(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.get_session(args.session)
        state = client.get_state(args.session)
    write(args.file, args.session, info.spec, state)
    print(f"exported {args.session!r} (epoch {state.epoch}, C={info.spec.n_classes}) to {args.file}")
    return 0


def import_state(args: argparse.Namespace) -> int:
    name_in_file, spec, state = read(args.file)
    session = args.session or name_in_file
    if not session:
        print("lossd import: the file names no session; give one", file=sys.stderr)
        return 1
    with _client(args) as client:
        try:
            client.get_session(session)
        except NotFoundError:
            client.create_session(session, spec)  # same spec as exported; an existing one must match
        info = client.load_state(session, state)
    print(f"imported {args.file} into {session!r} (epoch {info.epoch}, C={info.spec.n_classes})")
    return 0


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=False)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in (header, *rows)]
    return "\n".join(line.rstrip() for line in lines)
