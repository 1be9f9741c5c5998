"""Checks that need no model and no torch, run by the CLI before a command imports anything heavy: a missing
model folder, an unknown dataset or an output folder that cannot be written is reported in a second, not after
a minute of imports."""

from __future__ import annotations

import os
import re
from pathlib import Path

from tunesmith.config.fields import Config
from tunesmith.config.loader import ConfigError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model_path(cfg: Config) -> list[str]:
    """A local model folder must exist and hold config.json; a hub id (org/name) is only tried when online."""
    name = cfg.model.model_name_or_path
    if not name:
        return []
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            return [f"`model_name_or_path`: the folder `{name}` holds no config.json, so it is not a model folder"]
        return []
    if path.exists():
        return [f"`model_name_or_path`: `{name}` is a file; give the model's folder"]
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if HUB_ID.match(name) and not offline:
        return []  # a hub id, downloaded by transformers
    why = " (and HF_HUB_OFFLINE is set, so it is not looked up on a hub)" if HUB_ID.match(name) else ""
    return [f"`model_name_or_path`: the folder `{name}` does not exist{why}"]


def check_output_dir(cfg: Config) -> list[str]:
    out = cfg.training.output_dir
    if not out:
        return []
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        return [f"`output_dir`: `{out}` is a file, not a folder"]
    try:  # created now (it would be anyway): the only sure test that it can be
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return [f"`output_dir`: `{out}` cannot be created ({err.strerror}); choose a folder you can write to"]
    if not os.access(path, os.W_OK | os.X_OK):
        return [f"`output_dir`: `{out}` is not writable; choose a folder you can write to"]
    return []


def check_datasets(cfg: Config) -> list[str]:
    from tunesmith.data.errors import DataError
    from tunesmith.data.registry import resolve

    problems = []
    for names in (cfg.data.dataset, cfg.data.eval_dataset):
        if names:
            try:
                resolve(names, cfg.data.dataset_dir)
            except DataError as err:
                problems.append(str(err))
    return problems


def preflight(command: str, cfg: Config) -> None:
    """Raise ConfigError with every problem found; commands re-check the rest once they load."""
    from tunesmith.config import validate

    if command == "webui":  # it starts the other commands, which check their own settings
        return
    problems = validate.check_model(cfg) + check_model_path(cfg)
    if command == "train":
        if cfg.training.do_train:
            problems += validate.check_data(cfg) + validate.check_finetuning(cfg) + validate.check_training(cfg)
        problems += check_output_dir(cfg) + check_datasets(cfg)
    elif command in ("predict", "data"):
        problems += check_datasets(cfg)
        if command == "predict":
            problems += check_output_dir(cfg)
    if command in ("predict", "chat", "serve", "export", "eval", "data"):
        problems += validate.check_finetuning(cfg)
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
