"""`tunesmith predict cfg.yaml` (and the classic `train --do_predict --predict_with_generate`): render each
sample's prompt with the training template, generate, write predictions in dataset order, score them."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from tunesmith.config import Config
from tunesmith.config.validate import check_finetuning, check_model, raise_if
from tunesmith.data.conversation import Conversation
from tunesmith.data.pipeline import DataReport, load_conversations, mix
from tunesmith.data.registry import resolve

log = logging.getLogger("tunesmith.predict")


def validate_for_predict(cfg: Config) -> None:
    problems = check_model(cfg) + check_finetuning(cfg)
    if not (cfg.data.eval_dataset or cfg.data.dataset):
        problems.append("`dataset` (or `eval_dataset`) is required: the samples to predict")
    if not cfg.training.output_dir:
        problems.append("`output_dir` is required: where generated_predictions.jsonl goes")
    if cfg.finetuning.stage != "sft":
        problems.append(f"predicting with `stage: {cfg.finetuning.stage}` is not supported yet; use sft")
    if cfg.training.per_device_eval_batch_size < 1:
        problems.append("`per_device_eval_batch_size` must be at least 1")
    raise_if(problems)


def label_of(conv: Conversation) -> str | None:
    """The reference answer: the final assistant turn, which the prompt leaves out."""
    if not conv.messages or conv.messages[-1].role != "assistant":
        return None
    last = conv.messages[-1]
    calls = [json.dumps({"name": c.name, "arguments": c.arguments}, ensure_ascii=False) for c in last.tool_calls]
    return "\n".join([last.content] * bool(last.content) + calls)


def load_samples(cfg: Config) -> list[Conversation]:
    names = cfg.data.eval_dataset or cfg.data.dataset or ""
    parts = load_conversations(resolve(names, cfg.data.dataset_dir), cfg, DataReport(), allow_unanswered=True)
    return mix(parts, cfg.data.mix_strategy, cfg.data.interleave_probs, cfg.training.seed)


def make_engine(cfg: Config, tokenizer: Any, template: Any) -> Any:
    if cfg.model.infer_backend == "vllm":
        from tunesmith.infer.vllm import VLLMEngine

        return VLLMEngine(cfg, template.stop)
    from tunesmith.infer.hf import HFEngine
    from tunesmith.model.loading import load_for_inference

    return HFEngine(load_for_inference(cfg), tokenizer, template.stop, cfg.generation)


def truncate_prompts(prompts: list[str], tokenizer: Any, limit: int) -> list[str]:
    """Keep the last `limit` tokens of over-long prompts (the question and the generation prompt), counted."""
    out, cut = [], 0
    for prompt in prompts:
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        if len(ids) > limit:
            prompt, cut = tokenizer.decode(ids[-limit:]), cut + 1
        out.append(prompt)
    if cut:
        log.warning("%d prompt(s) longer than cutoff_len (%d tokens) were cut from the left", cut, limit)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def run(cfg: Config, extras: dict[str, Any]) -> int:
    from tunesmith.model.tokenizer import load_inference_tokenizer
    from tunesmith.predict.metrics import score

    validate_for_predict(cfg)
    tokenizer, template = load_inference_tokenizer(cfg)
    if template is None:
        from tunesmith.data.templates import load_template

        template = load_template("default", tokenizer, cfg.model.default_system)
    samples = load_samples(cfg)
    prompts = truncate_prompts([template.render_prompt(c) for c in samples], tokenizer, cfg.data.cutoff_len)
    labels = [label_of(c) for c in samples]
    engine = make_engine(cfg, tokenizer, template)
    started = time.time()
    generations = engine.generate(prompts, cfg.training.per_device_eval_batch_size)
    seconds = time.time() - started
    out = Path(cfg.training.output_dir)  # type: ignore[arg-type]
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "generated_predictions.jsonl", [{"prompt": p, "predict": g.text, "label": l or ""}
                                                      for p, g, l in zip(prompts, generations, labels)])
    results: dict[str, Any] = {}
    answered = [(g.text, l) for g, l in zip(generations, labels) if l is not None]
    if answered:
        results.update(score([p for p, _ in answered], [l for _, l in answered]))
        if len(answered) < len(samples):
            results["predict_unlabelled_samples"] = len(samples) - len(answered)
    else:
        print("the samples have no reference answers: predictions written, metrics omitted")
    tokens = sum(g.n_tokens for g in generations)
    results.update({"predict_samples": len(samples), "predict_runtime": round(seconds, 4),
                    "predict_samples_per_second": round(len(samples) / seconds, 3),
                    "predict_generated_tokens_per_second": round(tokens / seconds, 2)})
    tmp = out / f"predict_results.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out / "predict_results.json")
    print(json.dumps(results, indent=2))
    return 0
