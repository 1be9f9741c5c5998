"""Where a training run starts: the checkpoint it resumes from (or a fresh, emptied output folder), the config
saved beside it that resumes it when rerun, and the log trimmed back to the resumed step."""

from __future__ import annotations

import logging
from pathlib import Path

from tunesmith.config import Config, config_to_yaml
from tunesmith.config.loader import ConfigError
from tunesmith.train import checkpoint as ckpt

log = logging.getLogger("tunesmith.train")


def find_resume_point(cfg: Config) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; refuses to overwrite a user's folder.
    Incomplete checkpoint folders (a killed save or deletion) are skipped and named."""
    t = cfg.training
    out = Path(t.output_dir)  # type: ignore[arg-type]
    if t.resume_from_checkpoint:
        path = Path(t.resume_from_checkpoint)
        missing = ckpt.missing_files(path) if path.is_dir() else ["the folder itself"]
        if missing:
            raise ConfigError([f"`resume_from_checkpoint`: {path} is not a complete tunesmith checkpoint (it lacks "
                               f"{', '.join(missing)})"])
        return path
    if t.overwrite_output_dir or not out.is_dir():
        return None
    for path, missing in ckpt.incomplete_checkpoints(out):
        log.warning("skipping %s: incomplete (lacks %s)", path, ", ".join(missing))
    checkpoints = ckpt.list_checkpoints(out)
    if checkpoints:
        return checkpoints[-1]
    leftovers = [p for p in out.iterdir() if not (p.name.startswith("checkpoint-") and
                                                  (p.name.endswith(ckpt.PARTIAL_SUFFIXES) or p.is_dir()))]
    if not leftovers:
        return None
    raise ConfigError([f"output_dir `{out}` is not empty and holds no complete checkpoint to resume from; set "
                       "`overwrite_output_dir: true` to start over in it (its checkpoints are then deleted), or "
                       "choose another folder"])


def start_fresh(out: Path) -> None:
    """`overwrite_output_dir: true`: an earlier run's checkpoints and log go, so runs never mix."""
    old = [p for p in out.iterdir() if p.is_dir() and ckpt.CHECKPOINT_RE.match(p.name)] if out.is_dir() else []
    for path in old:
        ckpt.delete_checkpoint(path)
    if (out / "trainer_log.jsonl").exists():
        (out / "trainer_log.jsonl").unlink()
    if old:
        log.info("overwrite_output_dir: removed %d checkpoint(s) of an earlier run in %s", len(old), out)


def saved_config(cfg: Config) -> str:
    """output_dir/tunesmith_config.yaml: rerunning it resumes this run from its latest checkpoint."""
    import copy

    again = copy.deepcopy(cfg)
    again.training.overwrite_output_dir = False
    again.training.resume_from_checkpoint = None
    return config_to_yaml(again)


def trim_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (the resumed run writes them again), and a
    last line cut short by a crash."""
    if path.is_file():
        import json

        kept = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and entry.get("current_steps", step + 1) <= step:
                kept.append(line)
        path.write_text("".join(l + "\n" for l in kept), encoding="utf-8")
