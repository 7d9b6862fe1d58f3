"""What the harnesses measure with: a trainer placed mid-schedule with batches in memory, and peak memory."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ..engine.trainer import Trainer, to_device


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float | None:
    """Peak resident set size of this process (since start or ``reset_peak_rss``); None if unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def steady_trainer(cfg: DictConfig, n_batches: int = 1) -> tuple[Trainer, list[dict]]:
    """A Trainer in train mode placed mid-schedule (past supervised warm-ups and ramp-ups, so a method's
    full step is measured) and ``n_batches`` batches already on its device."""
    trainer = Trainer(cfg)
    loaders = trainer.train_loaders()
    batches = [{k: to_device(next(it), trainer.device) for k, it in loaders.items()} for _ in range(n_batches)]
    trainer.method.train()
    trainer.step = trainer.max_iters // 2
    return trainer, batches
