"""One training process per GPU without a launcher: `tunesmith train` starts torchrun itself.

With several visible GPUs (or `nproc_per_node: N`, which also runs N gloo processes on a CPU), a plain
`tunesmith train` writes its resolved config to a temporary file and runs
`python -m torch.distributed.run --standalone --nproc_per_node N -m tunesmith.cli train that.yaml`, then waits.
The processes it starts see WORLD_SIZE and train; under torchrun, accelerate or deepspeed launchers nothing is
started again.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tunesmith.config import Config, config_to_yaml

log = logging.getLogger("tunesmith.train")


def processes_wanted(cfg: Config) -> int:
    """`nproc_per_node`, by default one per visible CUDA GPU (one on a CPU); 1 inside a launched group."""
    if "WORLD_SIZE" in os.environ:
        return 1
    n = cfg.training.nproc_per_node
    if n is None:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 1
    return max(1, n)


def launch(cfg: Config, processes: int) -> int:
    """Run this training as `processes` processes under torchrun; their exit code is the command's."""
    with tempfile.TemporaryDirectory(prefix="tunesmith-launch-") as folder:
        config = Path(folder) / "config.yaml"
        config.write_text(config_to_yaml(cfg), encoding="utf-8")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "tunesmith.cli", "train", str(config)]
        log.info("starting %d training processes (nproc_per_node; 1 keeps a single process): %s", processes,
                 " ".join(cmd))
        return subprocess.call(cmd)
