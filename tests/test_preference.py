"""Stages rm and dpo: losses against plain PyTorch, learning on the demo set, resume, predict and export."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import DATA_DIR, TINY_MODEL, keep_only_checkpoint, write_dataset
from tunesmith.cli import main

PAIRS = [{"instruction": f"What is {i} plus {i}?", "chosen": f"{i} + {i} = {2 * i}.",
          "rejected": f"{i} + {i} = {2 * i + 3}."} for i in range(16)]


@pytest.fixture()
def pref_dir(tmp_path):
    write_dataset(tmp_path / "data", "pairs", PAIRS, {"ranking": True})
    return tmp_path / "data"


def train(tmp_path, model, data_dir, name, *extra):
    out = tmp_path / name
    args = ["train", f"model_name_or_path={model}", f"dataset_dir={data_dir}", f"output_dir={out}",
            f"data_cache_dir={tmp_path / 'cache'}", "dataset=pairs", "template=chatml", "cutoff_len=128", "logging_steps=1",
            "per_device_train_batch_size=4", "save_strategy=no", "disable_tqdm=true", "seed=3", *extra]
    assert main(args) == 0
    return out


def log_lines(out):
    return [json.loads(l) for l in (out / "trainer_log.jsonl").read_text().splitlines()]


def pair_texts(tokenizer, pairs):
    from tunesmith.data.conversation import Conversation, Message
    from tunesmith.data.templates import load_template

    template = load_template("chatml", tokenizer)
    texts = []
    for p in pairs:
        for answer in (p["chosen"], p["rejected"]):
            conv = Conversation([Message("user", p["instruction"]), Message("assistant", answer)])
            [rendered] = template.render_chat(conv)
            texts.append(rendered.text)
    return texts


@torch.no_grad()
def test_rm_first_loss_equals_plain_pytorch(tmp_path, tiny_model_dir, pref_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from tunesmith.model.value_head import RewardModel

    out = train(tmp_path, tiny_model_dir, pref_dir, "rm", "stage=rm", "finetuning_type=full", "max_steps=1")
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    head = RewardModel(lm, lm.config.hidden_size, seed=3).v_head  # the same seeded initialisation
    import numpy as np

    order = np.random.default_rng([3, 0]).permutation(len(PAIRS)).tolist()[:4]
    texts = pair_texts(tokenizer, [PAIRS[i] for i in order])
    scores = []
    for text in texts:
        ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
        hidden = lm(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
        scores.append(head(hidden).squeeze())
    scores = torch.stack(scores)
    expected = float(-F.logsigmoid(scores[0::2] - scores[1::2]).mean())
    assert log_lines(out)[0]["loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("loss,expected", [("sigmoid", math.log(2)), ("ipo", (1 / (2 * 0.1)) ** 2), ("hinge", 1.0)])
def test_dpo_first_loss_with_policy_equal_to_reference(tmp_path, tiny_model_dir, pref_dir, loss, expected):
    # LoRA starts as a no-op, so the policy equals the reference: the margin is 0 at step 1.
    out = train(tmp_path, tiny_model_dir, pref_dir, f"dpo_{loss}", "stage=dpo", "max_steps=1", f"pref_loss={loss}")
    first = log_lines(out)[0]
    assert first["loss"] == pytest.approx(expected, rel=1e-5)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


@torch.no_grad()
def test_dpo_ftx_adds_the_chosen_nll(tmp_path, tiny_model_dir, pref_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    import numpy as np

    out = train(tmp_path, tiny_model_dir, pref_dir, "dpo_ftx", "stage=dpo", "max_steps=1", "pref_ftx=0.5")
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    order = np.random.default_rng([3, 0]).permutation(len(PAIRS)).tolist()[:4]
    nll = []
    for i in order:
        text = pair_texts(tokenizer, [PAIRS[i]])[0]
        ids = tokenizer.encode(text, add_special_tokens=False)
        answer = tokenizer.encode(PAIRS[i]["chosen"] + "<|im_end|>", add_special_tokens=False)
        logits = lm(input_ids=torch.tensor([ids])).logits[0]
        start = len(ids) - len(answer) - 1  # the answer ends with <|im_end|> then "\n"
        logp = torch.log_softmax(logits[start - 1 : start - 1 + len(answer)], -1)
        nll.append(-logp.gather(-1, torch.tensor(answer)[:, None]).mean())
    expected = math.log(2) + 0.5 * float(torch.stack(nll).mean())
    assert log_lines(out)[0]["loss"] == pytest.approx(expected, rel=1e-4)


def test_rm_learns_the_demo_preference_and_predicts(tmp_path):
    out = train(tmp_path, TINY_MODEL, DATA_DIR, "rm_demo", "stage=rm", "dataset=preference_demo", "val_size=0.1",
                "lora_target=all", "lora_rank=16", "learning_rate=1e-3", "num_train_epochs=2", "cutoff_len=96",
                "per_device_train_batch_size=8", "do_train=true", "do_eval=true", "logging_steps=10")
    accuracy = json.loads((out / "eval_results.json").read_text())["eval_accuracy"]
    assert accuracy >= 0.9
    assert (out / "value_head.safetensors").is_file() and (out / "adapter_model.safetensors").is_file()
    pred = tmp_path / "rm_pred"
    assert main(["predict", f"model_name_or_path={TINY_MODEL}", f"adapter_name_or_path={out}", "stage=rm",
                 "dataset=preference_demo", f"dataset_dir={DATA_DIR}", "max_samples=40", f"output_dir={pred}",
                 "template=chatml"]) == 0
    rows = [json.loads(l) for l in (pred / "generated_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 40 and {"chosen_score", "rejected_score"} <= set(rows[0])
    exported = tmp_path / "rm_export"
    assert main(["export", f"model_name_or_path={TINY_MODEL}", f"adapter_name_or_path={out}",
                 f"export_dir={exported}"]) == 0
    assert (exported / "value_head.safetensors").is_file()


def test_dpo_reward_accuracy_rises(tmp_path):
    out = train(tmp_path, TINY_MODEL, DATA_DIR, "dpo_demo", "stage=dpo", "dataset=preference_demo", "max_samples=200",
                "lora_target=all", "lora_rank=16", "learning_rate=5e-3", "num_train_epochs=1", "cutoff_len=96",
                "per_device_train_batch_size=8", "logging_steps=5", "pref_beta=0.1")
    accuracies = [l["rewards/accuracies"] for l in log_lines(out) if "rewards/accuracies" in l]
    assert accuracies[-1] >= 0.75 and max(accuracies[-2:]) > accuracies[0]


def test_dpo_full_precomputed_reference_and_rm_resume(tmp_path, tiny_model_dir, pref_dir):
    ref = train(tmp_path, tiny_model_dir, pref_dir, "dpo_copy", "stage=dpo", "finetuning_type=full", "max_steps=2")
    pre = train(tmp_path, tiny_model_dir, pref_dir, "dpo_pre", "stage=dpo", "finetuning_type=full", "max_steps=2",
                "precompute_ref=true")
    assert [l["loss"] for l in log_lines(ref)] == pytest.approx([l["loss"] for l in log_lines(pre)], rel=1e-5)
    common = ["stage=rm", "max_steps=4", "save_strategy=steps", "save_steps=2", "lora_dropout=0.1"]
    straight = train(tmp_path, tiny_model_dir, pref_dir, "rm_straight", *common)
    stopped = train(tmp_path, tiny_model_dir, pref_dir, "rm_stopped", *common)
    keep_only_checkpoint(stopped, "checkpoint-2")
    assert main(["train", str(stopped / "tunesmith_config.yaml")]) == 0
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        a, b = load_file(straight / name), load_file(stopped / name)
        assert all(torch.equal(a[k], b[k]) for k in a)


@torch.no_grad()
def test_orpo_first_loss_equals_plain_pytorch(tmp_path, tiny_model_dir, pref_dir, tokenizer):
    import numpy as np
    from transformers import AutoModelForCausalLM

    out = train(tmp_path, tiny_model_dir, pref_dir, "orpo", "stage=dpo", "pref_loss=orpo", "pref_beta=0.2",
                "max_steps=1")
    lm = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    order = np.random.default_rng([3, 0]).permutation(len(PAIRS)).tolist()[:4]
    losses = []
    for i in order:
        avg = []
        for text, answer in zip(pair_texts(tokenizer, [PAIRS[i]]), (PAIRS[i]["chosen"], PAIRS[i]["rejected"])):
            ids = tokenizer.encode(text, add_special_tokens=False)
            target = tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False)
            start = len(ids) - len(target) - 1
            logp = torch.log_softmax(lm(input_ids=torch.tensor([ids])).logits[0, start - 1 : start - 1 + len(target)], -1)
            avg.append(logp.gather(-1, torch.tensor(target)[:, None]).mean())
        log_odds = (avg[0] - avg[1]) - (torch.log1p(-avg[0].exp()) - torch.log1p(-avg[1].exp()))
        losses.append(-avg[0] - 0.2 * F.logsigmoid(log_odds))
    assert log_lines(out)[0]["loss"] == pytest.approx(float(torch.stack(losses).mean()), rel=1e-4)
