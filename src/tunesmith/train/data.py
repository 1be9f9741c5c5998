"""The tokenizer, the chat template and the encoded datasets of a training config, as `tunesmith train` and
`tunesmith data` both load them."""

from __future__ import annotations

import logging
from typing import Any

from tunesmith.config import Config
from tunesmith.data.pipeline import Datasets, build_datasets
from tunesmith.stages.base import Stage

log = logging.getLogger("tunesmith.train")


def load_training_data(cfg: Config, stage: Stage, accelerator: Any = None) -> tuple[Any, Any, Datasets]:
    """(tokenizer, template or None for plain-text stages, datasets). With an accelerator, rank 0 tokenizes and
    caches while the other ranks wait, then read the cache."""
    import contextlib

    from tunesmith.data.templates import load_template
    from tunesmith.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg)
    template = load_template(cfg.model.template, tokenizer, cfg.model.default_system) if stage.uses_template \
        else None
    first = accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext()
    with first:
        data = build_datasets(cfg, tokenizer, template, stage.rows)
    if accelerator is not None and accelerator.is_main_process:
        report = data.report
        log.info("data: %d train / %s eval samples; rows skipped %s; samples dropped %s; truncated %d",
                 len(data.train), len(data.eval) if data.eval is not None else 0, dict(report.rows_bad) or 0,
                 dict(report.samples_dropped) or 0, report.truncated)
    return tokenizer, template, data
