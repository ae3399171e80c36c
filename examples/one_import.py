"""Train a small classifier with Online Label Smoothing computed by lossd.

    python examples/one_import.py                         # starts a server in-process
    python examples/one_import.py --target host:50051     # uses a running `lossd serve`

The training loop is the reference module's; only the import changed.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from torch import nn

from lossd import OnlineLabelSmoothing  # was: from ols import OnlineLabelSmoothing


def synthetic_blobs(centres: torch.Tensor, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian clusters around ``centres``: a 10-class problem that needs no download."""
    labels = torch.randint(0, centres.shape[0], (n,), generator=generator)
    return centres[labels] + 1.5 * torch.randn(n, centres.shape[1], generator=generator), labels


def train(target: str, epochs: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(10, 32, generator=generator)
    x, y = synthetic_blobs(centres, 2048, generator)
    x_val, y_val = synthetic_blobs(centres, 512, generator)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with OnlineLabelSmoothing(alpha=0.5, n_classes=10, smoothing=0.1, target=target) as criterion:
        for epoch in range(epochs):
            model.train()
            criterion.train()
            for batch in torch.randperm(len(x)).split(128):
                loss = criterion(model(x[batch]), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            model.eval()
            criterion.eval()  # validation batches never update the soft labels
            with torch.no_grad():
                logits = model(x_val)
                val_loss = criterion(logits, y_val).item()
                accuracy = (logits.argmax(1) == y_val).float().mean().item()
            criterion.next_epoch()
            print(f"epoch {epoch}: val loss {val_loss:.4f}, val accuracy {accuracy:.3f}")
        return criterion.supervise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help="a running lossd server; default: start one in this process")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        target = args.target
        if target is None:
            from lossd_server.config import Settings
            from lossd_server.embedded import EmbeddedServer

            target = stack.enter_context(EmbeddedServer(Settings(port=0, device="auto"))).target
        supervise = train(target, args.epochs)
    print("soft label of class 0:", [round(v, 3) for v in supervise[:, 0].tolist()])


if __name__ == "__main__":
    main()
