"""Stage kto: the first steps against a plain PyTorch KTO (losses and the update between them), the exact first
loss where policy and reference agree, bad labels, learning on the demo set, freeze tuning and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA_DIR, TINY_MODEL, keep_only_checkpoint, write_dataset
from tunesmith.cli import main

ROWS = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                      {"role": "assistant", "content": f"{i} + {i} = {2 * i + (0 if i % 2 == 0 else 3)}."}],
         "label": i % 2 == 0} for i in range(8)]
ENTRY = {"formatting": "sharegpt", "columns": {"messages": "messages", "kto_tag": "label"},
         "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}


@pytest.fixture()
def kto_dir(tmp_path):
    write_dataset(tmp_path / "data", "fb", ROWS, ENTRY)
    return tmp_path / "data"


def train(tmp_path, model, data_dir, name, *extra, dataset="fb"):
    out = tmp_path / name
    args = ["train", f"model_name_or_path={model}", f"dataset_dir={data_dir}", f"output_dir={out}",
            f"data_cache_dir={tmp_path / 'cache'}", f"dataset={dataset}", "template=chatml", "cutoff_len=128",
            "stage=kto", "logging_steps=1", "per_device_train_batch_size=4", "save_strategy=no", "disable_tqdm=true",
            "seed=3", "lr_scheduler_type=constant", *extra]
    assert main(args) == 0
    return out


def log_lines(out):
    return [json.loads(l) for l in (out / "trainer_log.jsonl").read_text().splitlines()]


def answer_logps(model, tokenizer, prompt_row, answer_row):
    """Summed log-probability of answer_row's answer (with <|im_end|>) after prompt_row's question, plain PyTorch."""
    from tunesmith.data.conversation import Conversation, Message
    from tunesmith.data.templates import load_template

    question, answer = prompt_row["messages"][0]["content"], answer_row["messages"][1]["content"]
    [rendered] = load_template("chatml", tokenizer).render_chat(
        Conversation([Message("user", question), Message("assistant", answer)]))
    ids = tokenizer.encode(rendered.text, add_special_tokens=False)
    target = tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False)
    start = len(ids) - len(target) - 1  # the rendering ends with <|im_end|> then "\n"
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits[start - 1: start - 1 + len(target)], -1)
    return logp.gather(-1, torch.tensor(target)[:, None]).sum()


def plain_kto_loss(policy, reference, tokenizer, batch, beta, weights):
    """KTO on one batch of dataset indices: mismatched answers are the next row's (rotation by one)."""
    n = len(ROWS)
    own = torch.stack([answer_logps(policy, tokenizer, ROWS[i], ROWS[i]) for i in batch])
    with torch.no_grad():
        ref_own = torch.stack([answer_logps(reference, tokenizer, ROWS[i], ROWS[i]) for i in batch])
        kl = torch.stack([answer_logps(policy, tokenizer, ROWS[i], ROWS[(i + 1) % n])
                          - answer_logps(reference, tokenizer, ROWS[i], ROWS[(i + 1) % n]) for i in batch])
    z = kl.mean().clamp(min=0)
    losses = []
    for k, i in enumerate(batch):
        r = own[k] - ref_own[k]
        if ROWS[i]["label"]:
            losses.append(weights[0] * (1 - torch.sigmoid(beta * (r - z))))
        else:
            losses.append(weights[1] * (1 - torch.sigmoid(beta * (z - r))))
    return torch.stack(losses).mean()


def test_first_steps_equal_plain_pytorch(tmp_path, tiny_model_dir, kto_dir, tokenizer):
    """Full tuning against its frozen copy: step 1's loss, one AdamW step (clipped), step 2's loss."""
    from transformers import AutoModelForCausalLM

    beta, weights, lr = 0.3, (1.0, 1.5), 1e-3
    out = train(tmp_path, tiny_model_dir, kto_dir, "kto", "finetuning_type=full", "max_steps=2", f"pref_beta={beta}",
                f"kto_chosen_weight={weights[0]}", f"kto_rejected_weight={weights[1]}", f"learning_rate={lr}")
    logged = [l["loss"] for l in log_lines(out) if "loss" in l]
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).train()
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    order = np.random.default_rng([3, 0]).permutation(len(ROWS)).tolist()
    expected = []
    for step in range(2):
        with torch.enable_grad():
            loss = plain_kto_loss(policy, reference, tokenizer, order[4 * step: 4 * step + 4], beta, weights)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        expected.append(float(loss))
    assert logged == pytest.approx(expected, rel=1e-5)
    assert expected[0] != pytest.approx(expected[1], rel=1e-3)  # the update between them mattered


def test_first_loss_where_policy_equals_reference(tmp_path, tiny_model_dir, kto_dir):
    # LoRA starts as a no-op: every log-ratio and the KL estimate are 0, so each sample's loss is weight x 1/2.
    out = train(tmp_path, tiny_model_dir, kto_dir, "kto_lora", "max_steps=1", "kto_rejected_weight=2.0")
    first = log_lines(out)[0]
    order = np.random.default_rng([3, 0]).permutation(len(ROWS)).tolist()[:4]
    desirable = sum(ROWS[i]["label"] for i in order)
    assert first["loss"] == pytest.approx((0.5 * desirable + 1.0 * (4 - desirable)) / 4, rel=1e-6)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6) and first["count/chosen"] == desirable / 4


def test_labels_must_be_booleans_and_of_both_kinds(tmp_path, tiny_model_dir, capsys):
    bad = [dict(ROWS[0], label="yes")] + ROWS[1:]
    write_dataset(tmp_path / "bad", "fb", bad, ENTRY)
    args = ["train", f"model_name_or_path={tiny_model_dir}", "dataset=fb", "template=chatml", "stage=kto",
            f"output_dir={tmp_path / 'o'}", f"data_cache_dir={tmp_path / 'cache'}"]
    assert main(args + [f"dataset_dir={tmp_path / 'bad'}"]) == 2
    err = capsys.readouterr().err
    assert "fb.json, row 1, field `label`" in err and "true or false" in err
    write_dataset(tmp_path / "one", "fb", [dict(r, label=True) for r in ROWS], ENTRY)
    assert main(args + [f"dataset_dir={tmp_path / 'one'}"]) == 2
    assert "every training sample is labelled desirable" in capsys.readouterr().err
    write_dataset(tmp_path / "untagged", "fb", ROWS, {**ENTRY, "columns": {"messages": "messages"}})
    assert main(args + [f"dataset_dir={tmp_path / 'untagged'}"]) == 2
    assert "maps no `kto_tag` column" in capsys.readouterr().err


def test_kto_learns_the_demo_feedback_and_resumes(tmp_path):
    out = train(tmp_path, TINY_MODEL, DATA_DIR, "kto_demo", "lora_target=all", "lora_rank=16", "learning_rate=2e-3",
                "max_steps=30", "per_device_train_batch_size=8", "logging_steps=10", dataset="kto_demo")
    lines = [l for l in log_lines(out) if "rewards/chosen" in l]
    margins = [l["rewards/chosen"] - l["rewards/rejected"] for l in lines]
    assert margins[-1] > 1.0 and margins[-1] > margins[0]
    assert lines[-1]["loss"] < lines[0]["loss"]


def test_freeze_tuning_resumes_exactly(tmp_path, tiny_model_dir, kto_dir):
    common = ["finetuning_type=freeze", "freeze_trainable_layers=1", "max_steps=4", "save_strategy=steps",
              "save_steps=2", "precompute_ref=true"]
    straight = train(tmp_path, tiny_model_dir, kto_dir, "straight", *common)
    stopped = train(tmp_path, tiny_model_dir, kto_dir, "stopped", *common)
    keep_only_checkpoint(stopped, "checkpoint-2")
    assert main(["train", str(stopped / "tunesmith_config.yaml")]) == 0
    a, b = load_file(straight / "model.safetensors"), load_file(stopped / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
