"""What the figures ran on: cores, CPU model, torch, the commit."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def describe(device: str = "cpu") -> dict[str, Any]:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": affinity,
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "device": device,
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def header(info: dict[str, Any]) -> str:
    commit = info["commit"] + (" (+ uncommitted changes)" if info["dirty"] else "")
    line = (
        f"{info['date']}  {info['cores']} cores, {info['cpu']}  python {info['python']}, torch {info['torch']} "
        f"({info['torch_threads']} intra-op thread(s))  device {info['device']}"
    )
    if "gpu" in info:
        line += f" ({info['gpu']})"
    if info.get("load_average") is not None:
        line += f"  load {info['load_average']:.2f}"
    return line + f"  lossd {commit}"
