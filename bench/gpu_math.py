"""Time the server's loss math on a CUDA device against the HBM floor (read logits + write gradient).

Prints a table; used for the figures in the closing notes. ``python bench/gpu_math.py``.
"""

from __future__ import annotations

import torch

from lossd import functional as F


def _median_ms(fn: object, repeats: int = 50) -> float:
    times = []
    for _ in range(5):
        fn()  # type: ignore[operator]
    torch.cuda.synchronize()
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()  # type: ignore[operator]
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    device = torch.device("cuda")
    copy = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    target = torch.empty_like(copy)
    copy_ms = _median_ms(lambda: target.copy_(copy))
    bandwidth = 2 * copy.numel() / (copy_ms / 1e3)  # bytes read + written per second
    print(f"{torch.cuda.get_device_name()}  device-to-device copy: {bandwidth / 1e12:.2f} TB/s")
    print(f"{'shape':>14} {'dtype':>9} {'kind':>6} {'ms':>8} {'floor ms':>9} {'ratio':>6}")
    for n, c, dtype in ((256, 1000, torch.float32), (1024, 1000, torch.float32), (1024, 32000, torch.bfloat16)):
        _time_shape(n, c, dtype, bandwidth)


def _time_shape(n: int, c: int, dtype: torch.dtype, bandwidth: float) -> None:
    device = torch.device("cuda")
    logits = torch.randn(n, c, device=device).to(dtype)
    labels = torch.randint(0, c, (n,), device=device)
    soft = F.initial_soft_labels(c, 0.1, device=device)
    acc = torch.zeros(c, c, dtype=torch.float64, device=device)
    floor_ms = 2 * logits.numel() * logits.element_size() / bandwidth * 1e3

    def ols(compiled: bool = False) -> None:
        out = F.online_label_smoothing(logits, labels, soft, alpha=0.5, compiled=compiled)
        assert out.grad is not None
        out.grad.to(dtype)
        rows, probs = F.correct_rows(out, labels)
        acc.index_add_(0, rows, probs)

    def ls(compiled: bool = False) -> None:
        out = F.smoothed_cross_entropy(logits, labels, smoothing=0.1, compiled=compiled)
        assert out.grad is not None
        out.grad.to(dtype)

    # Eager, then through torch.compile (the server's --compile-math): the fused kernels are what
    # can approach the HBM floor; eager is a dozen passes over [N, C].
    runs = (("ls", ls), ("ols", ols), ("ls-c", lambda: ls(True)), ("ols-c", lambda: ols(True)))
    for kind, fn in runs:
        ms = _median_ms(fn)
        print(f"{n:>6}x{c:<7} {str(dtype)[6:]:>9} {kind:>6} {ms:8.3f} {floor_ms:9.3f} {ms / floor_ms:6.1f}")


if __name__ == "__main__":
    main()
