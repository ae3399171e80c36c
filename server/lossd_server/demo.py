"""``lossd demo``: a small model trained on real data with CE, LS and OLS through a lossd server.

scikit-learn's digits (1,797 8x8 images, shipped with scikit-learn, no download) and
a two-layer MLP, one run per loss and seed. Each run draws its own stratified
train/test split and initial weights from the seed, so the three losses of a seed see
the same data and the same start. Without ``--target`` an embedded server on loopback
serves the runs and stops afterwards. Prints test accuracy, ECE (15 equal-width bins)
and NLL as mean ± std over the seeds, and writes PNGs: the final OLS soft labels, a
reliability diagram per loss and the test accuracy per epoch.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lossd
from lossd_server.soft_label_view import heatmap_png

LOSSES = ("CE", "LS", "OLS")
ECE_BINS = 15


@dataclass
class Run:
    loss: str
    seed: int
    accuracy_per_epoch: list[float] = field(default_factory=list)
    accuracy: float = 0.0
    ece: float = 0.0
    nll: float = 0.0
    confidences: torch.Tensor | None = None  # test-set max probability
    hits: torch.Tensor | None = None  # test-set argmax == label
    soft_labels: torch.Tensor | None = None  # OLS only: S after the last epoch


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = commands.add_parser("demo", help="train a small model on scikit-learn's digits with CE, LS and OLS")
    demo.add_argument("--target", help="a running lossd server (default: start an embedded one on loopback)")
    demo.add_argument("--epochs", type=int, default=15, help="training epochs per run (default 15)")
    demo.add_argument(
        "--seeds", type=int, default=3, help="runs per loss, each with its own split and init (default 3)"
    )
    demo.add_argument("--samples", type=int, default=1797, help="how many of the 1,797 images to use (default all)")
    demo.add_argument("--alpha", type=float, default=0.5, help="OLS weight of the hard CE term (default 0.5)")
    demo.add_argument("--smoothing", type=float, default=0.1, help="LS epsilon, and OLS's initial S (default 0.1)")
    demo.add_argument("--out", type=Path, default=Path("lossd-demo"), help="where the PNGs go (default ./lossd-demo)")


def run_demo(args: argparse.Namespace) -> int:
    try:
        from sklearn.datasets import load_digits  # type: ignore[import-untyped]
        from tqdm import tqdm  # type: ignore[import-untyped]
    except ImportError as error:
        print(
            f"lossd demo: needs scikit-learn, tqdm and matplotlib: pip install 'lossd[tools]' ({error})",
            file=sys.stderr,
        )
        return 1
    if args.epochs < 1 or args.seeds < 1 or not 20 <= args.samples <= 1797:
        print("lossd demo: --epochs and --seeds must be >= 1, --samples in [20, 1797]", file=sys.stderr)
        return 2
    features, labels = load_digits(return_X_y=True)
    x = torch.tensor(features[: args.samples], dtype=torch.float32) / 16.0
    y = torch.tensor(labels[: args.samples], dtype=torch.int64)
    args.out.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    try:
        with _server(args.target) as target:
            todo = [(loss, seed) for seed in range(args.seeds) for loss in LOSSES]
            with tqdm(total=len(todo) * args.epochs, desc="lossd demo", unit="epoch", file=sys.stderr) as bar:
                for loss, seed in todo:
                    bar.set_postfix_str(f"{loss} seed {seed}")
                    runs.append(_train(loss, seed, x, y, target, args, bar.update))
    except lossd.LossdError as error:
        print(f"lossd demo: {str(error).splitlines()[0]}", file=sys.stderr)
        return 1
    print(_table(runs))
    for path in _plots(runs, args):
        print(f"wrote {path}")
    return 0


@contextlib.contextmanager
def _server(target: str | None) -> Iterator[str]:
    if target:
        yield target
        return
    from lossd_server.config import Settings
    from lossd_server.embedded import EmbeddedServer

    settings = Settings(host="127.0.0.1", port=0, store="memory", device="cpu", grace_seconds=1)
    logger = logging.getLogger("lossd_server")
    level = logger.level
    logger.setLevel(logging.ERROR)  # its start-up notes (store=memory...) would break the demo's output
    try:
        with EmbeddedServer(settings) as server:
            yield server.target
    finally:
        logger.setLevel(level)


def _split(n: int, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A stratified 70/30 split of range(n) drawn from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in range(int(labels.max()) + 1):
        members = (labels == c).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        cut = round(0.7 * len(members))
        train.append(members[:cut])
        test.append(members[cut:])
    return torch.cat(train), torch.cat(test)


def _loss_module(loss: str, args: argparse.Namespace, target: str) -> lossd.RemoteLoss:
    connection: dict[str, Any] = {"target": target, "retry_deadline": 5.0}  # a missing server fails in seconds
    if loss == "CE":
        return lossd.CrossEntropyLoss(**connection)
    if loss == "LS":
        return lossd.LabelSmoothingLoss(10, args.smoothing, **connection)
    return lossd.OnlineLabelSmoothing(args.alpha, 10, args.smoothing, **connection)


def _train(
    loss: str, seed: int, x: torch.Tensor, y: torch.Tensor, target: str, args: argparse.Namespace, tick: Any
) -> Run:
    train, test = _split(len(y), y, seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    run = Run(loss, seed)
    with _loss_module(loss, args, target) as criterion:
        for _ in range(args.epochs):
            model.train()
            criterion.train()
            order = train[torch.randperm(len(train), generator=generator)]
            for batch in torch.split(order, 64):
                optimizer.zero_grad(set_to_none=True)
                criterion(model(x[batch]), y[batch]).backward()
                optimizer.step()
            if isinstance(criterion, lossd.OnlineLabelSmoothing):
                criterion.next_epoch()
            run.accuracy_per_epoch.append(_evaluate(model, x[test], y[test])[0])
            tick(1)
        if isinstance(criterion, lossd.OnlineLabelSmoothing):
            run.soft_labels = criterion.state().supervise
    run.accuracy, run.ece, run.nll, run.confidences, run.hits = _evaluate(model, x[test], y[test])
    return run


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float, Any, Any]:
    model.eval()
    with torch.no_grad():
        log_probs = model(x).log_softmax(dim=1)
    confidences, predictions = log_probs.exp().max(dim=1)
    hits = predictions == y
    nll = float(-log_probs.gather(1, y.unsqueeze(1)).mean())
    return float(hits.float().mean()), expected_calibration_error(confidences, hits), nll, confidences, hits


def confidence_bins(confidences: torch.Tensor, bins: int = ECE_BINS) -> torch.Tensor:
    """The bin of each confidence: (0, 1/bins] is bin 0, ..., ((bins-1)/bins, 1] the last, as in Guo et al."""
    return (confidences * bins).ceil().clamp(1, bins).long() - 1


def expected_calibration_error(confidences: torch.Tensor, hits: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE over equal-width confidence bins (Guo et al. 2017): sum_b |B_b|/n * |acc(B_b) - conf(B_b)|."""
    which = confidence_bins(confidences, bins)
    total = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            gap = hits[members].float().mean() - confidences[members].mean()
            total += float(members.float().mean()) * abs(float(gap))
    return total


def _mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {spread:.4f}"


def _table(runs: list[Run]) -> str:
    seeds = len({run.seed for run in runs})
    lines = [f"test set, mean ± std over {seeds} seed(s)", f"{'loss':<5} {'accuracy':>17} {'ECE':>17} {'NLL':>17}"]
    for loss in LOSSES:
        mine = [run for run in runs if run.loss == loss]
        columns = (_mean_std([getattr(run, name) for run in mine]) for name in ("accuracy", "ece", "nll"))
        lines.append(f"{loss:<5} " + " ".join(f"{column:>17}" for column in columns))
    return "\n".join(lines)


def _plots(runs: list[Run], args: argparse.Namespace) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    last_ols = next((run for run in reversed(runs) if run.soft_labels is not None), None)
    if last_ols is not None and last_ols.soft_labels is not None:
        path = args.out / "ols_soft_labels.png"
        heatmap_png(last_ols.soft_labels, path, f"OLS soft labels after {args.epochs} epochs (seed {last_ols.seed})")
        written.append(path)
    for loss in LOSSES:
        mine = [run for run in runs if run.loss == loss]
        confidences = torch.cat([run.confidences for run in mine if run.confidences is not None])
        hits = torch.cat([run.hits for run in mine if run.hits is not None])
        path = args.out / f"reliability_{loss.lower()}.png"
        _reliability(plt, confidences, hits, f"{loss}: reliability ({len(mine)} seed(s) pooled)", path)
        written.append(path)
    figure, axes = plt.subplots(figsize=(6, 4))
    for loss in LOSSES:
        curves = torch.tensor([run.accuracy_per_epoch for run in runs if run.loss == loss])
        axes.plot(range(1, curves.shape[1] + 1), curves.mean(dim=0).tolist(), marker="o", label=loss)
    axes.set_xlabel("epoch")
    axes.set_ylabel("test accuracy (mean over seeds)")
    axes.legend()
    figure.tight_layout()
    path = args.out / "accuracy_per_epoch.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    written.append(path)
    return written


def _reliability(plt: Any, confidences: torch.Tensor, hits: torch.Tensor, title: str, path: Path) -> None:
    which = confidence_bins(confidences)
    centres, accuracies = [], []
    for b in range(ECE_BINS):
        members = which == b
        if members.any():
            centres.append((b + 0.5) / ECE_BINS)
            accuracies.append(float(hits[members].float().mean()))
    figure, axes = plt.subplots(figsize=(4.5, 4.5))
    axes.bar(centres, accuracies, width=1 / ECE_BINS, edgecolor="black", label="accuracy")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("confidence")
    axes.set_ylabel("accuracy")
    ece = expected_calibration_error(confidences, hits)
    axes.set_title(f"{title}\nECE {ece:.4f}", fontsize=9)
    axes.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
