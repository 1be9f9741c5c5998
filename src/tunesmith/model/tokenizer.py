"""Load the tokenizer of the configured model, with an actionable error when it cannot be found."""

from __future__ import annotations

import copy
from typing import Any

from tunesmith.config import Config
from tunesmith.config.loader import ConfigError


def load_tokenizer(cfg: Config) -> Any:
    from transformers import AutoTokenizer

    path = cfg.model.model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code,
                                                  revision=cfg.model.model_revision, cache_dir=cfg.model.cache_dir)
    except (OSError, ValueError) as err:
        raise ConfigError([f"`model_name_or_path`: could not load a tokenizer from `{path}`: {err}".splitlines()[0]
                           + "; point it at a folder with tokenizer files (offline: hub ids only work once cached)"]
                          ) from None
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError([f"`model_name_or_path`: the tokenizer of `{path}` is a slow (Python) tokenizer; tunesmith "
                           "needs a fast one for exact loss masks: convert it with transformers (tokenizer.json)"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def template_for(cfg: Config, tokenizer: Any, name: str | None = None, saved: dict[str, Any] | None = None) -> Any:
    """The configured chat template (`name` instead of cfg.model.template), with the config's template settings;
    `saved`: the settings a trained model was saved with, used where the config leaves them at their defaults."""
    from tunesmith.data.templates import load_template

    m, saved = cfg.model, saved or {}
    open_tag, _, close_tag = cfg.data.reasoning_tags.partition(",")
    return load_template(name or m.template, tokenizer, m.default_system or saved.get("default_system"),
                         kwargs=m.template_kwargs or saved.get("template_kwargs"),
                         enable_thinking=m.enable_thinking and saved.get("enable_thinking", True),
                         reasoning_tags=(open_tag.strip(), close_tag.strip()))


def load_inference_tokenizer(cfg: Config, fallback: str | None = "default") -> tuple[Any, Any]:
    """Tokenizer and chat template for using a trained model: the tokenizer saved with the (last) adapter when
    there is one (it carries the training template), else the base model's; `template` other than auto wins.
    A model with no template of its own gets the named template `fallback` (None: no template)."""
    from pathlib import Path

    from tunesmith.model.loading import saved_template_name

    adapters = cfg.adapter_paths()
    if adapters and (Path(adapters[-1]) / "tokenizer_config.json").is_file():
        cfg = copy.deepcopy(cfg)
        cfg.model.model_name_or_path = adapters[-1]
    saved = saved_template_name(cfg.model.model_name_or_path)
    tokenizer = load_tokenizer(cfg)
    template = None
    if cfg.model.template != "auto" or tokenizer.chat_template:
        template = template_for(cfg, tokenizer, saved=saved)
        tokenizer.chat_template = template.jinja
    elif fallback is not None:
        template = template_for(cfg, tokenizer, fallback, saved=saved)
    return tokenizer, template
