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

    from tunesmith.data.templates import template_note
    from tunesmith.model.tokenizer import load_tokenizer, template_for

    tokenizer = load_tokenizer(cfg)
    template = template_for(cfg, tokenizer) if stage.uses_template else None
    if template is not None and (accelerator is None or accelerator.is_main_process):
        note = template_note(template.name)
        if note:
            log.log(logging.WARNING if "differs" in note else logging.INFO, note)
        forms = template.forms
        log.info("template `%s`: reasoning %s, tool-call arguments as a %s%s, turns end with %s", template.name,
                 forms.reasoning, forms.arguments, ", call ids generated where missing" if forms.needs_ids else "",
                 forms.end_of_turn or " / ".join(forms.turn_openers) or "(nothing)")
    first = accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext()
    with first:
        data = build_datasets(cfg, tokenizer, template, stage.rows)
    if accelerator is not None and accelerator.is_main_process:
        report = data.report
        log.info("data: %d train / %s eval samples; rows skipped %s; samples dropped %s; truncated %d",
                 len(data.train), len(data.eval) if data.eval is not None else 0, dict(report.rows_bad) or 0,
                 dict(report.samples_dropped) or 0, report.truncated)
        if report.expanded:
            log.info("data: the template renders earlier turns differently once later turns follow, so %d "
                     "conversations became %d extra sequences, one per trained turn (%d extra tokens; "
                     "`mask_history: true` trains only the last turn)", report.expanded,
                     report.expansion_sequences, report.expansion_tokens)
    return tokenizer, template, data
