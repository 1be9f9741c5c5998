"""QLoRA on this CPU: a 4-bit (nf4) base with a LoRA adapter learns, its adapter loads with peft on the
full-precision base, export merges into that base, and predict runs on the quantized base plus adapter."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_MODEL, write_dataset
from tunesmith.cli import main

pytest.importorskip("bitsandbytes")

CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Egypt", "Cairo"), ("Peru", "Lima"),
            ("Kenya", "Nairobi"), ("Chile", "Santiago"), ("Spain", "Madrid")]


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("qlora")
    rows = [{"instruction": f"What is the capital of {c}?", "output": f"The capital of {c} is {city}."}
            for _ in range(6) for c, city in CAPITALS]
    write_dataset(tmp / "data", "capitals", rows)
    out = tmp / "out"
    common = [f"model_name_or_path={TINY_MODEL}", f"dataset_dir={tmp / 'data'}", "dataset=capitals",
              "template=chatml", f"data_cache_dir={tmp / 'cache'}", "disable_tqdm=true", "quantization_bit=4"]
    assert main(["train", *common, f"output_dir={out}", "finetuning_type=lora", "lora_target=all", "lora_rank=8",
                 "per_device_train_batch_size=8", "learning_rate=1e-2", "max_steps=30", "val_size=8",
                 "eval_strategy=steps", "eval_steps=30", "logging_steps=5", "save_strategy=no", "seed=3",
                 "do_train=true", "do_eval=true"]) == 0
    return tmp, out, common


def test_a_4bit_lora_run_learns(qlora_run, tmp_path):
    tmp, out, common = qlora_run
    before = tmp_path / "before"
    assert main(["train", *common, f"output_dir={before}", "val_size=8", "seed=3", "--do_eval"]) == 0
    start = json.loads((before / "eval_results.json").read_text())["eval_loss"]
    end = json.loads((out / "eval_results.json").read_text())["eval_loss"]
    assert end < start / 2, (start, end)


def test_the_adapter_loads_with_peft_on_the_full_precision_base(qlora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, out, _ = qlora_run
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, out)
    assert sum(1 for n, _ in model.named_parameters() if "lora_A" in n) > 0


def test_export_merges_into_the_full_precision_base_and_verifies(qlora_run, capsys):
    tmp, out, common = qlora_run
    exported = tmp / "exported"
    assert main(["export", f"model_name_or_path={TINY_MODEL}", f"adapter_name_or_path={out}", "quantization_bit=4",
                 f"export_dir={exported}", "export_dtype=float32", "--verify"]) == 0
    captured = capsys.readouterr()
    assert "verify OK" in captured.out and "merged into the full-precision base" in captured.err
    assert json.loads((exported / "config.json").read_text()).get("quantization_config") is None


def test_predict_on_the_quantized_base_with_its_adapter(qlora_run):
    tmp, out, common = qlora_run
    pred = tmp / "pred"
    assert main(["predict", *common, f"adapter_name_or_path={out}", f"output_dir={pred}", "max_samples=4",
                 "max_new_tokens=8", "predict_with_generate=true"]) == 0
    lines = (pred / "generated_predictions.jsonl").read_text().splitlines()
    assert len(lines) == 4
