"""`tunesmith predict cfg.yaml` (and the classic `train --do_predict --predict_with_generate`): render each
sample's prompt with the training template, generate, write predictions in dataset order, score them."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from tunesmith import stages
from tunesmith.config import Config
from tunesmith.config.validate import check_finetuning, check_model, raise_if
from tunesmith.data.conversation import Conversation
from tunesmith.infer.reasoning import split_answer
from tunesmith.data.pipeline import DataReport, load_conversations, mix
from tunesmith.data.registry import resolve

log = logging.getLogger("tunesmith.predict")


def validate_for_predict(cfg: Config) -> None:
    problems = check_model(cfg) + check_finetuning(cfg)
    if not (cfg.data.eval_dataset or cfg.data.dataset):
        problems.append("`dataset` (or `eval_dataset`) is required: the samples to predict")
    if not cfg.training.output_dir:
        problems.append("`output_dir` is required: where generated_predictions.jsonl goes")
    if stages.get(cfg.finetuning.stage).predict is None:
        problems.append(f"predicting with `stage: {cfg.finetuning.stage}` is not supported; use "
                        + " or ".join(stages.predicting()))
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


def predict_rewards(cfg: Config, tokenizer: Any, template: Any, samples: list[Conversation], out: Path) -> int:
    """A stage that scores (rm): the chosen and rejected score of every pair, and how often chosen wins."""
    from tunesmith.model.loading import load_for_inference
    from tunesmith.model.value_head import HEAD_FILE, score_sequences

    adapters = cfg.adapter_paths()
    head_dir = adapters[-1] if adapters else cfg.model.model_name_or_path
    if not (Path(head_dir) / HEAD_FILE).is_file():
        from tunesmith.config.loader import ConfigError

        raise ConfigError([f"no {HEAD_FILE} in `{head_dir}`: point adapter_name_or_path (or model_name_or_path) at a "
                           "reward model trained with `stage: rm`"])
    lm = load_for_inference(cfg)
    rows = []
    for conv in samples:
        texts = [template.render_chat(conv.with_answer(answer))[-1].text  # type: ignore[arg-type]
                 for answer in (conv.chosen, conv.rejected)]
        chosen, rejected = score_sequences(lm, head_dir, tokenizer, texts)
        rows.append({"prompt": template.render_prompt(conv), "chosen": conv.chosen.content,  # type: ignore[union-attr]
                     "rejected": conv.rejected.content, "chosen_score": round(chosen, 6),  # type: ignore[union-attr]
                     "rejected_score": round(rejected, 6)})
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "generated_predictions.jsonl", rows)
    results = {"predict_samples": len(rows),
               "predict_accuracy": round(sum(r["chosen_score"] > r["rejected_score"] for r in rows) / len(rows), 4)}
    (out / "predict_results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


def load_samples(cfg: Config) -> list[Conversation]:
    names = cfg.data.eval_dataset or cfg.data.dataset or ""
    rows = stages.get(cfg.finetuning.stage).rows
    parts = load_conversations(resolve(names, cfg.data.dataset_dir), cfg, DataReport(), rows, allow_unanswered=True)
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
    samples = load_samples(cfg)
    if stages.get(cfg.finetuning.stage).predict == "score":
        return predict_rewards(cfg, tokenizer, template, samples, Path(cfg.training.output_dir))  # type: ignore[arg-type]
    prompts = truncate_prompts([template.render_prompt(c) for c in samples], tokenizer, cfg.data.cutoff_len)
    labels = [label_of(c) for c in samples]
    engine = make_engine(cfg, tokenizer, template)
    started = time.time()
    log.info("generating answers for %d samples", len(prompts))
    generations = engine.generate(prompts, cfg.training.per_device_eval_batch_size,
                                  progress=not cfg.training.disable_tqdm)
    seconds = time.time() - started
    out = Path(cfg.training.output_dir)  # type: ignore[arg-type]
    out.mkdir(parents=True, exist_ok=True)
    # the answer without its reasoning block is what is scored (the reference answers carry none either)
    tags = template.reasoning_tags
    split = [split_answer(g.text, tags, p.rstrip().endswith(tags[0])) for p, g in zip(prompts, generations)]
    write_jsonl(out / "generated_predictions.jsonl", [
        {"prompt": p, "predict": answer, "label": l or "", **({"reasoning": r} if r is not None else {})}
        for p, (r, answer), l in zip(prompts, split, labels)])
    results: dict[str, Any] = {}
    answered = [(answer, l) for (_, answer), l in zip(split, labels) if l is not None]
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
