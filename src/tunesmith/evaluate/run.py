"""`tunesmith eval`: MMLU / C-Eval / CMMLU-style multiple choice, n-shot, with per-subject prefix reuse."""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from tunesmith.config import Config
from tunesmith.config.validate import check_finetuning, check_model, raise_if
from tunesmith.evaluate.scoring import build_prompts, choice_token_ids, score_full, score_with_prefix
from tunesmith.evaluate.tasks import CHOICES, Subject, load_task


def validate_for_eval(cfg: Config) -> None:
    e, problems = cfg.eval, check_model(cfg) + check_finetuning(cfg)
    if not e.task:
        problems.append("`task` is required: mmlu, ceval, cmmlu, a folder under task_dir, or <task>_<split>")
    if e.n_shot < 0:
        problems.append(f"`n_shot` must be >= 0, got {e.n_shot}")
    if e.batch_size < 1:
        problems.append(f"`batch_size` must be at least 1, got {e.batch_size}")
    raise_if(problems)


def evaluate_subjects(model: Any, tokenizer: Any, template: Any, subjects: list[Subject], cfg: Config) -> list[dict]:
    """One record per question: subject, id, gold, predicted, the four probabilities."""
    e = cfg.eval
    letters = choice_token_ids(tokenizer, template, e.lang)
    from tqdm.auto import tqdm

    scorer = score_with_prefix if e.prefix_reuse else score_full
    records = []
    bar = tqdm(total=sum(len(s.questions) for s in subjects), desc="eval", unit="question", dynamic_ncols=True,
               disable=cfg.training.disable_tqdm)
    for subject in subjects:
        bar.set_postfix_str(subject.name)
        prompts = build_prompts(subject, template, e.lang, e.n_shot, cfg.training.seed)
        scored = scorer(model, tokenizer, prompts, letters, e.batch_size)
        for q, probs in zip(subject.questions, scored.probs):
            records.append({"subject": subject.name, "category": subject.category, "id": q.id, "gold": q.answer,
                            "predicted": CHOICES[max(range(4), key=probs.__getitem__)],
                            "probs": dict(zip(CHOICES, (round(p, 6) for p in probs)))})
        bar.update(len(subject.questions))
    bar.close()
    return records


def summarize(records: list[dict]) -> dict[str, Any]:
    """Accuracy (x100) per subject, per category (question-weighted) and on average."""
    by_subject, by_category = defaultdict(list), defaultdict(list)
    for r in records:
        if r["gold"] is not None:
            hit = float(r["predicted"] == r["gold"])
            by_subject[r["subject"]].append(hit)
            by_category[r["category"]].append(hit)
    mean = lambda xs: round(100 * sum(xs) / len(xs), 2)  # noqa: E731
    every = [h for hits in by_subject.values() for h in hits]
    return {"average": mean(every) if every else None, "questions": len(every),
            "categories": {c: mean(h) for c, h in sorted(by_category.items())},
            "subjects": {s: mean(h) for s, h in sorted(by_subject.items())}}


def table(results: dict[str, Any]) -> str:
    lines = [f"{'category':>22}  accuracy"]
    lines += [f"{name:>22}  {acc:6.2f}" for name, acc in results["categories"].items()]
    lines.append(f"{'Average':>22}  {results['average']:6.2f}   ({results['questions']} questions)")
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def run(cfg: Config, extras: dict[str, Any]) -> int:
    from tunesmith.model.loading import load_for_inference
    from tunesmith.model.tokenizer import load_inference_tokenizer

    validate_for_eval(cfg)
    e = cfg.eval
    task_name, split, subjects = load_task(e.task, e.task_dir, e.split, e.n_shot, e.subjects)  # type: ignore[arg-type]
    tokenizer, template = load_inference_tokenizer(cfg, fallback="vanilla")
    model = load_for_inference(cfg)
    started = time.time()
    records = evaluate_subjects(model, tokenizer, template, subjects, cfg)
    seconds = time.time() - started
    save_dir = Path(e.save_dir) if e.save_dir else None
    if save_dir:
        save_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(save_dir / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    if all(r["gold"] is None for r in records):
        submission = defaultdict(dict)
        for r in records:
            submission[r["subject"]][r["id"]] = r["predicted"]
        print(f"the `{split}` split of `{task_name}` has no answers: nothing to score; "
              + (f"wrote the predictions as a submission file to {save_dir / 'submission.json'}" if save_dir
                 else "set `save_dir` to write a submission file"))
        if save_dir:
            write_atomic(save_dir / "submission.json", json.dumps(submission, ensure_ascii=False, indent=1) + "\n")
        return 0
    results = summarize(records) | {"task": task_name, "split": split, "n_shot": e.n_shot,
                                    "seconds": round(seconds, 2)}
    text = table(results)
    print(text)
    if save_dir:
        write_atomic(save_dir / "results.json", json.dumps(results, ensure_ascii=False, indent=2) + "\n")
        write_atomic(save_dir / "results.log", text + "\n")
    return 0
