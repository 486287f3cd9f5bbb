"""Metrics to TensorBoard event files (tensorboardX), a jsonl file, and a PNG of the loss curves."""

from __future__ import annotations

import json
import pathlib

import numpy as np

# bf16 dense peak per chip, for MFU (model FLOPs utilisation); unknown platforms report no MFU.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5": 459e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
    "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}


def peak_flops(device_kind: str) -> float | None:
    for name, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if device_kind.startswith(name):
            return flops
    return None


class MetricsWriter:
    """Writes scalars to <dir>/tensorboard (event files) and <dir>/metrics.jsonl (only on process 0)."""

    def __init__(self, directory: str | pathlib.Path, *, enabled: bool = True):
        self.directory = pathlib.Path(directory)
        self.enabled = enabled
        self.history: dict[str, list[tuple[int, float]]] = {}
        if enabled:
            from tensorboardX import SummaryWriter

            self.directory.mkdir(parents=True, exist_ok=True)
            self.tensorboard = SummaryWriter(str(self.directory / "tensorboard"))
            self.jsonl = open(self.directory / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())

    def write(self, step: int, scalars: dict[str, float]) -> None:
        scalars = {k: float(v) for k, v in scalars.items()}
        for name, value in scalars.items():
            self.history.setdefault(name, []).append((step, value))
        if not self.enabled:
            return
        for name, value in scalars.items():
            self.tensorboard.add_scalar(name, value, step)
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()

    def plot(self, path: str | pathlib.Path, names=("train/loss", "eval/loss")) -> pathlib.Path | None:
        """PNG of the named curves over steps."""
        if not self.enabled or not any(self.history.get(n) for n in names):
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
        for name in names:
            if self.history.get(name):
                steps, values = np.array(self.history[name]).T
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("cross entropy (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return pathlib.Path(path)

    def close(self) -> None:
        if self.enabled:
            self.tensorboard.close()
            self.jsonl.close()
