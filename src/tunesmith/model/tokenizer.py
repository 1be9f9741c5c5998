"""Load the tokenizer of the configured model, with an actionable error when it cannot be found."""

from __future__ import annotations

import copy
from typing import Any

from tunesmith.config import Config
from tunesmith.data.errors import DataError


def load_tokenizer(cfg: Config) -> Any:
    from transformers import AutoTokenizer

    path = cfg.model.model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code,
                                                  revision=cfg.model.model_revision, cache_dir=cfg.model.cache_dir)
    except (OSError, ValueError) as err:
        raise DataError(f"could not load a tokenizer from `{path}`: {err}".splitlines()[0],
                        fix="point `model_name_or_path` at a folder with tokenizer files (offline: hub ids "
                            "only work once cached)", reason="missing model") from None
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"the tokenizer of `{path}` is a slow (Python) tokenizer; tunesmith needs a fast one "
                        "for exact loss masks", fix="convert it with transformers (tokenizer.json)",
                        reason="slow tokenizer")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_inference_tokenizer(cfg: Config) -> tuple[Any, Any]:
    """Tokenizer and chat template for using a trained model: the tokenizer saved with the (last) adapter when
    there is one (it carries the training template), else the base model's; `template` other than auto wins."""
    from pathlib import Path

    from tunesmith.data.templates import load_template

    adapters = cfg.adapter_paths()
    if adapters and (Path(adapters[-1]) / "tokenizer_config.json").is_file():
        cfg = copy.deepcopy(cfg)
        cfg.model.model_name_or_path = adapters[-1]
    tokenizer = load_tokenizer(cfg)
    template = None
    if cfg.model.template != "auto" or tokenizer.chat_template:
        template = load_template(cfg.model.template, tokenizer, cfg.model.default_system)
        tokenizer.chat_template = template.jinja
    return tokenizer, template
