"""The hardware profile of a training run: what the loop does differently on this kind of device, chosen once
before the model is built (`choose_profile`).

The loop calls it at fixed points and nowhere else: `start` before the model and data exist, `prepare` once the
setup is built (it returns the pass runner), `before_pass` before every forward+backward, `after_step`, and
`memory` for the results. `shape_bucket` rounds batch lengths for kernels that compile per shape. The default
profile (GPUs) does nothing at any of them; the CPU's lives in train/cpu/.
"""

from __future__ import annotations

from typing import Any

from tunesmith.config import Config
from tunesmith.config.loader import ConfigError
from tunesmith.train.passes import SerialPasses


class Profile:
    name = "default"

    def __init__(self, cfg: Config):
        self.cfg = cfg

    @property
    def shape_bucket(self) -> int:
        return 1

    def start(self) -> None:
        """Process-wide settings, before the model and data exist."""

    def prepare(self, setup: Any) -> SerialPasses:
        workers = self.cfg.training.parallel_passes
        if workers > 1:
            raise ConfigError([f"`parallel_passes: {workers}` runs passes on the threads of one CPU process, but "
                               f"the device is {setup.accelerator.device.type}: set `parallel_passes: 1`"])
        return SerialPasses(setup.data.train.lengths, self.cfg.training.max_tokens_per_forward, setup.accelerator)

    def before_pass(self) -> None:
        """Called before every forward+backward."""

    def after_step(self) -> None:
        """Called after every optimizer step."""

    def memory(self) -> dict[str, float]:
        return {}


def choose_profile(cfg: Config) -> Profile:
    import torch

    if torch.cuda.is_available():
        return Profile(cfg)
    from tunesmith.train.cpu import CPUProfile

    return CPUProfile(cfg)
