"""What the user sees during and after training: a progress bar, trainer_log.jsonl, trackers, result files
and loss plots. Only the main process writes."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from tunesmith.config import Config

log = logging.getLogger("tunesmith.train")


class TrainLogger:
    def __init__(self, cfg: Config, total_steps: int, is_main: bool):
        self.cfg, self.total_steps, self.is_main = cfg, total_steps, is_main
        self.out = Path(cfg.training.output_dir or ".")
        self.start = time.time()
        self.bar = None
        self.tracker: Any = None
        if not is_main:
            return
        if not cfg.training.disable_tqdm:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, desc="train", dynamic_ncols=True)
        if cfg.training.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tracker = SummaryWriter(cfg.training.logging_dir or str(self.out / "runs"))
        elif cfg.training.report_to == "wandb":
            import wandb

            wandb.init(name=cfg.training.run_name, config=cfg.to_flat_dict())
            self.tracker = wandb

    def resume_at(self, step: int) -> None:
        """Start the bar at `step` without counting the skipped steps into its speed or remaining time."""
        if self.bar is not None:
            self.bar.n = self.bar.last_print_n = self.bar.initial = step
            self.bar.refresh()
        self.resumed_from = step
        self.start = time.time()

    def advance(self, step: int, loss: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")

    def record(self, entry: dict[str, Any], step: int) -> dict[str, Any]:
        """Append one line to trainer_log.jsonl (LLaMA-Factory's field names) and the tracker."""
        elapsed = time.time() - self.start
        done = max(step - getattr(self, "resumed_from", 0), 1)
        remaining = elapsed / done * (self.total_steps - step)
        line = {"current_steps": step, "total_steps": self.total_steps, **entry,
                "percentage": round(100 * step / self.total_steps, 2),
                "elapsed_time": _hms(elapsed), "remaining_time": _hms(remaining)}
        if not self.is_main:
            return line
        with open(self.out / "trainer_log.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")
        if self.bar is not None and "loss" in entry:
            self.bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{entry.get('lr', 0):.2e}",
                                 tok_s=f"{entry.get('supervised_tokens_per_s', entry.get('tokens_per_s', 0)):.0f}")
        if self.bar is not None and "eval_loss" in entry:
            self.bar.write(f"step {step}: eval_loss {entry['eval_loss']:.4f}")
        numbers = {k: v for k, v in entry.items() if isinstance(v, (int, float))}
        if self.cfg.training.report_to == "tensorboard":
            for key, value in numbers.items():
                self.tracker.add_scalar(f"train/{key}" if not key.startswith("eval") else f"eval/{key}", value, step)
        elif self.cfg.training.report_to == "wandb":
            self.tracker.log(numbers, step=step)
        return line

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.cfg.training.report_to == "tensorboard" and self.tracker is not None:
            self.tracker.close()
        elif self.cfg.training.report_to == "wandb" and self.tracker is not None:
            self.tracker.finish()


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def write_results(out: Path, name: str, metrics: dict[str, Any]) -> None:
    """train_results.json / eval_results.json, merged into all_results.json."""
    (out / f"{name}_results.json").write_text(json.dumps(metrics, indent=2) + "\n")
    all_path = out / "all_results.json"
    merged = json.loads(all_path.read_text()) if all_path.is_file() else {}
    merged.update(metrics)
    all_path.write_text(json.dumps(merged, indent=2) + "\n")


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """Exponential moving average with bias correction, so the curve starts at the first value. Short curves
    are smoothed less, so the smoothed line does not lag far behind."""
    if weight is None:
        weight = 0.6 if len(values) < 50 else 0.9
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def plot_losses(out: Path) -> list[Path]:
    """training_loss.png and training_eval_loss.png from trainer_log.jsonl: raw and smoothed curves (and
    training_reward.png where the stage logs a reward: grpo)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = out / "trainer_log.jsonl"
    if not path.is_file():
        return []
    lines = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    written = []
    for key, filename in (("loss", "training_loss.png"), ("eval_loss", "training_eval_loss.png"),
                          ("reward", "training_reward.png")):
        points = [(l["current_steps"], l[key]) for l in lines if key in l and math.isfinite(l[key])]
        if not points:
            continue
        steps, values = zip(*points)
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(steps, values, color="#1f77b4", alpha=0.4, label="original")
        if len(values) > 1:
            ax.plot(steps, smooth(list(values)), color="#1f77b4", label="smoothed")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(f"{key} of {out.name}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / filename, dpi=100)
        plt.close(fig)
        written.append(out / filename)
    return written
