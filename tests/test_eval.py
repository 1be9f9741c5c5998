"""`tunesmith eval`: predictions equal a plain reference with and without prefix reuse; tables add up; layouts;
bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.data.errors import DataError
from tunesmith.evaluate.run import evaluate_subjects, summarize
from tunesmith.evaluate.scoring import build_prompts, choice_token_ids
from tunesmith.evaluate.tasks import CHOICES, load_task

TASKS = ROOT / "evaluation"


def setup(model_dir, n_shot, reuse, task="mmlu_demo", lang="en"):
    from tunesmith.model.loading import load_for_inference
    from tunesmith.model.tokenizer import load_inference_tokenizer

    cfg = load_config([f"model_name_or_path={model_dir}", "template=vanilla", f"task={task}", f"task_dir={TASKS}",
                       f"n_shot={n_shot}", f"prefix_reuse={reuse}", "batch_size=3", "infer_dtype=float32",
                       f"lang={lang}"])
    tokenizer, template = load_inference_tokenizer(cfg)
    return cfg, tokenizer, template, load_for_inference(cfg)


@torch.no_grad()
def reference(model, tokenizer, template, subjects, cfg):
    """Straightforward: each full prompt alone, one forward pass, softmax over the four letter logits."""
    letters = choice_token_ids(tokenizer, template, cfg.eval.lang)
    out = []
    for subject in subjects:
        for prompt in build_prompts(subject, template, cfg.eval.lang, cfg.eval.n_shot, cfg.training.seed):
            ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False)])
            out.append(torch.softmax(model(input_ids=ids).logits[0, -1, letters], -1).tolist())
    return out


@pytest.mark.parametrize("n_shot", [0, 5])
@pytest.mark.parametrize("reuse", [True, False])
def test_predictions_equal_reference(tiny_model_dir, n_shot, reuse):
    cfg, tokenizer, template, model = setup(tiny_model_dir, n_shot, reuse)
    _, _, subjects = load_task("mmlu_demo", str(TASKS), "validation", n_shot, None)
    records = evaluate_subjects(model, tokenizer, template, subjects, cfg)
    expected = reference(model, tokenizer, template, subjects, cfg)
    assert len(records) == len(expected) == 90
    for record, probs in zip(records, expected):
        assert [record["probs"][c] for c in CHOICES] == pytest.approx(probs, abs=1e-4)
        assert record["predicted"] == CHOICES[max(range(4), key=probs.__getitem__)]


def test_chinese_task_with_a_chat_template(tiny_model_dir):
    cfg, tokenizer, _, model = setup(tiny_model_dir, 2, True, task="ceval_demo", lang="zh")
    from tunesmith.data.templates import load_template

    template = load_template("chatml", tokenizer)
    _, _, subjects = load_task("ceval_demo", str(TASKS), "validation", 2, None)
    assert build_prompts(subjects[0], template, "zh", 2, 42)[0].endswith("\n答案：<|im_end|>\n<|im_start|>assistant\n")
    records = evaluate_subjects(model, tokenizer, template, subjects, cfg)
    expected = reference(model, tokenizer, template, subjects, cfg)
    assert len(records) == len(expected) == 60
    for record, probs in zip(records, expected):
        assert [record["probs"][c] for c in CHOICES] == pytest.approx(probs, abs=1e-4)


def test_tables_add_up():
    records = [{"subject": s, "category": c, "gold": "A", "predicted": p}
               for s, c, p in [("s1", "X", "A"), ("s1", "X", "B"), ("s2", "X", "A"), ("s3", "Y", "C")]]
    results = summarize(records)
    assert results["subjects"] == {"s1": 50.0, "s2": 100.0, "s3": 0.0}
    assert results["categories"] == {"X": pytest.approx(66.67), "Y": 0.0}
    assert results["average"] == 50.0 and results["questions"] == 4


def test_classic_command_and_outputs(tiny_model_dir, tmp_path, capsys):
    code = main(["eval", "--model_name_or_path", str(tiny_model_dir), "--template", "vanilla", "--task", "ceval_demo",
                 "--task_dir", str(TASKS), "--split", "validation", "--lang", "zh", "--n_shot", "5",
                 "--batch_size", "4", "--save_dir", str(tmp_path / "a")])
    assert code == 0 and "Average" in capsys.readouterr().out
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert set(results["categories"]) == {"STEM", "Social Science"} and results["questions"] == 60
    lines = (tmp_path / "a" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 60 and set(json.loads(lines[0])) >= {"subject", "id", "gold", "predicted", "probs"}
    assert (tmp_path / "a" / "results.log").read_text().strip().endswith("(60 questions)")
    # the newer spelling names the split in the task
    assert main(["eval", f"model_name_or_path={tiny_model_dir}", "template=vanilla", "task=ceval_demo_validation",
                 f"task_dir={TASKS}", "lang=zh", f"save_dir={tmp_path / 'b'}"]) == 0
    assert json.loads((tmp_path / "b" / "results.json").read_text())["average"] == results["average"]


def test_split_without_answers_writes_a_submission(tiny_model_dir, tmp_path, capsys):
    assert main(["eval", f"model_name_or_path={tiny_model_dir}", "template=vanilla", "task=ceval_demo_test",
                 f"task_dir={TASKS}", "lang=zh", f"save_dir={tmp_path}"]) == 0
    assert "has no answers" in capsys.readouterr().out
    submission = json.loads((tmp_path / "submission.json").read_text())
    assert set(submission) == {"arithmetic", "capitals"} and len(submission["capitals"]) == 20
    assert not (tmp_path / "results.json").exists()


def copy_task(tmp_path) -> Path:
    folder = tmp_path / "mytask"
    shutil.copytree(TASKS / "ceval_demo", folder)
    return folder


def test_bad_inputs_name_the_file_and_row(tmp_path):
    with pytest.raises(DataError, match="task folder `nope` not found"):
        load_task("nope", str(TASKS), "validation", 0, None)
    folder = copy_task(tmp_path)
    bad = folder / "val" / "capitals_val.csv"
    lines = bad.read_text(encoding="utf-8").splitlines()
    bad.write_text("\n".join(lines[:3] + [lines[3].replace(",A,", ",E,").replace(",B,", ",E,").replace(",C,", ",E,")
                                          .replace(",D,", ",E,")] + lines[4:]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"capitals_val.csv, row 4, field `answer`: answer `E`"):
        load_task("mytask", str(tmp_path), "validation", 0, None)
    bad.write_text("id,question,A,B,answer\n0,q,x,y,A\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"capitals_val.csv, row 1: missing column\(s\) \['C', 'D'\]"):
        load_task("mytask", str(tmp_path), "validation", 0, None)
    with pytest.raises(DataError, match=r"(?s)arithmetic_dev.csv.*`n_shot: 6` but the dev split of `arithmetic` has 5"):
        load_task("mytask", str(tmp_path), "validation", 6, "arithmetic")
    with pytest.raises(DataError, match=r"(?s)unknown subject\(s\) \['physics'\].*choose from: arithmetic, capitals"):
        load_task("mytask", str(tmp_path), "validation", 0, "physics")
    with pytest.raises(DataError, match=r"(?s)no `validation` split.*one of: dev, test$"):
        shutil.rmtree(folder / "val")
        load_task("mytask", str(tmp_path), "validation", 0, None)
