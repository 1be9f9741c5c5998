"""The training loop: exact losses against plain PyTorch, accumulation and resume equivalence, what trains,
checkpoints, best-model selection and config errors."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import keep_only_checkpoint, sft_rows, write_dataset
from tunesmith.cli import main
from tunesmith.train import checkpoint as ckpt


@pytest.fixture()
def data_dir(tmp_path):
    folder = tmp_path / "data"
    write_dataset(folder, "sft", sft_rows())
    write_dataset(folder, "corpus", [{"text": f"Number {i} comes before {i + 1}. " * (1 + i % 3)} for i in range(24)],
                  suffix=".jsonl")
    return folder


def train(tmp_path, model_dir, data_dir, out_name, *extra):
    out = tmp_path / out_name
    args = ["train", f"model_name_or_path={model_dir}", f"dataset_dir={data_dir}", f"output_dir={out}",
            f"data_cache_dir={tmp_path / 'cache'}", "dataset=sft", "template=chatml", "cutoff_len=64",
            "per_device_train_batch_size=2", "learning_rate=1e-2", "lr_scheduler_type=constant", "logging_steps=1",
            "save_strategy=no", "disable_tqdm=true", "seed=1", *extra]
    assert main(args) == 0
    return out


def logged(out, key="loss"):
    return [l[key] for l in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines()) if key in l]


def reference_losses(model_dir, tokenizer, data_dir, stage, steps, batch_size, seed, lr):
    """Plain PyTorch: each sample on its own (no packing), the same order, summed token CE / supervised tokens."""
    from transformers import AutoModelForCausalLM

    from tunesmith.config import load_config
    from tunesmith.data.pipeline import build_datasets
    from tunesmith.data.templates import load_template

    cfg = load_config([f"model_name_or_path={model_dir}", f"dataset_dir={data_dir}", "cutoff_len=64", f"stage={stage}",
                       f"dataset={'sft' if stage == 'sft' else 'corpus'}", f"seed={seed}"])
    data = build_datasets(cfg, tokenizer, None if stage == "pt" else load_template("chatml", tokenizer),
                          "text" if stage == "pt" else "chat", use_cache=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    order = np.random.default_rng([seed, 0]).permutation(len(data.train)).tolist()
    losses = []
    for step in range(steps):
        samples = [data.train[i] for i in order[step * batch_size : (step + 1) * batch_size]]
        total, count = 0.0, 0
        for ids, labels in samples:
            logits = model(input_ids=torch.tensor(ids[None], dtype=torch.long)).logits[0, :-1]
            target = torch.tensor(labels[1:], dtype=torch.long)
            total = total + torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum")
            count += int((target != -100).sum())
        (total / count).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(total.detach() / count))
    return losses


@pytest.mark.parametrize("stage", ["sft", "pt"])
def test_first_losses_equal_plain_pytorch(tmp_path, tiny_model_dir, tokenizer, data_dir, stage):
    out = train(tmp_path, tiny_model_dir, data_dir, f"out_{stage}", "finetuning_type=full", "max_steps=3",
                f"stage={stage}", f"dataset={'sft' if stage == 'sft' else 'corpus'}")
    expected = reference_losses(tiny_model_dir, tokenizer, data_dir, stage, 3, 2, 1, 1e-2)
    assert logged(out) == pytest.approx(expected, rel=1e-5, abs=1e-5)
    # a random 2-layer model starts near log(vocab size)
    assert abs(expected[0] - math.log(len(tokenizer))) < 0.5


def test_accumulation_is_equivalent_to_a_bigger_batch(tmp_path, tiny_model_dir, data_dir):
    # SGD: the weight change is lr x gradient, so equal weights mean equal gradients (Adam would amplify
    # float rounding in near-zero gradients).
    big = train(tmp_path, tiny_model_dir, data_dir, "b4", "finetuning_type=full", "max_steps=2",
                "per_device_train_batch_size=4", "optim=sgd", "learning_rate=0.5")
    acc = train(tmp_path, tiny_model_dir, data_dir, "b2x2", "finetuning_type=full", "max_steps=2",
                "per_device_train_batch_size=2", "gradient_accumulation_steps=2", "optim=sgd", "learning_rate=0.5")
    # the same batch cut into passes of at most 30 tokens (one sample each here): the same gradients again
    cut = train(tmp_path, tiny_model_dir, data_dir, "b4cut", "finetuning_type=full", "max_steps=2",
                "per_device_train_batch_size=4", "optim=sgd", "learning_rate=0.5", "max_tokens_per_forward=30")
    # the two micro-batches' samples dealt to two threads that run side by side: the same gradients again
    par = train(tmp_path, tiny_model_dir, data_dir, "b2x2par", "finetuning_type=full", "max_steps=2",
                "per_device_train_batch_size=2", "gradient_accumulation_steps=2", "optim=sgd", "learning_rate=0.5",
                "parallel_passes=2")
    for other in (acc, cut, par):
        assert logged(big) == pytest.approx(logged(other), rel=1e-6)
    a, *others = (load_file(out / "model.safetensors") for out in (big, acc, cut, par))
    for name in a:
        for other in others:
            torch.testing.assert_close(a[name], other[name], rtol=1e-5, atol=1e-7)


def test_parallel_passes_are_reproducible_and_deal_work_by_cost(tmp_path, tiny_model_dir, data_dir):
    from tunesmith.train.cpu.parallel_passes import deal_to_workers

    lengths = np.array([10, 40, 30, 20])
    window = [[[0], [1]], [[2], [3]]]
    # longest first, each to the least loaded worker; no pass longer than a micro-batch (50 tokens) by default
    assert deal_to_workers(window, lengths, 2, 0) == ([], [[[[1], [0]]], [[[2], [3]]]])
    assert deal_to_workers(window, lengths, 3, 0) == ([], [[[[1]]], [[[2]]], [[[3], [0]]]])
    # a budget bounds the tokens in flight: passes of 30 per worker, a longer unit alone on all cores
    assert deal_to_workers(window, lengths, 2, 60) == ([[[1]]], [[[[2]]], [[[3], [0]]]])
    assert deal_to_workers(window, lengths, 2, 30) == ([[[1]], [[2]], [[3]]], [[[[0]]], []])
    assert deal_to_workers(window, lengths, 2, 100) == ([], [[[[1], [0]]], [[[2], [3]]]])
    runs = [train(tmp_path, tiny_model_dir, data_dir, f"par{k}", "max_steps=3", "gradient_accumulation_steps=3",
                  "parallel_passes=2") for k in range(2)]
    first, second = (load_file(out / "adapter_model.safetensors") for out in runs)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_parallel_passes_under_a_token_budget_give_the_same_gradients(tmp_path, tiny_model_dir, data_dir):
    # pt on lines of about 10, 20 and 30 tokens: with 40 tokens in flight, the 30-token samples run alone on all
    # cores, the others two at a time
    common = ["stage=pt", "dataset=corpus", "finetuning_type=full", "max_steps=2", "per_device_train_batch_size=4",
              "gradient_accumulation_steps=2", "optim=sgd", "learning_rate=0.5"]
    plain = train(tmp_path, tiny_model_dir, data_dir, "plain", *common)
    mixed = train(tmp_path, tiny_model_dir, data_dir, "mixed", *common, "parallel_passes=2",
                  "max_tokens_per_forward=40", "trim_cpu_heap=true")
    assert logged(plain) == pytest.approx(logged(mixed), rel=1e-6)
    a, b = (load_file(out / "model.safetensors") for out in (plain, mixed))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)


def test_parallel_passes_refuse_what_they_cannot_run():
    from types import SimpleNamespace

    from tunesmith.config import load_config
    from tunesmith.config.loader import ConfigError
    from tunesmith.train.cpu import CPUProfile
    from tunesmith.train.passes import SerialPasses
    from tunesmith.train.profile import Profile

    cfg = load_config(["parallel_passes=2"])
    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=2, scaler=None)
    setup = SimpleNamespace(accelerator=acc, stepper=SimpleNamespace(owns_backward=True),
                            data=SimpleNamespace(train=SimpleNamespace(lengths=np.array([3]))))
    with pytest.raises(ConfigError, match="2 processes run, DeepSpeed/FSDP owns the backward.*set `parallel_passes: 1`"):
        CPUProfile(cfg).prepare(setup)
    with pytest.raises(ConfigError, match="the device is cuda: set `parallel_passes: 1`"):
        Profile(cfg).prepare(SimpleNamespace(**{**vars(setup), "accelerator": SimpleNamespace(
            device=torch.device("cuda"), num_processes=1)}))
    assert isinstance(CPUProfile(load_config([])).prepare(setup), SerialPasses)


def test_resume_ends_exactly_where_a_straight_run_does(tmp_path, tiny_model_dir, data_dir):
    common = ["finetuning_type=lora", "lora_rank=4", "lora_dropout=0.1", "max_steps=6", "save_strategy=steps",
              "save_steps=3", "lr_scheduler_type=cosine", "warmup_steps=1"]
    straight = train(tmp_path, tiny_model_dir, data_dir, "straight", *common)
    stopped = train(tmp_path, tiny_model_dir, data_dir, "stopped", *common)
    # Pretend the run was killed right after checkpoint-3: remove everything written later (the log keeps
    # lines of steps 4-6; the resumed run must replace them, not repeat them).
    keep_only_checkpoint(stopped, "checkpoint-3")
    assert main(["train", str(stopped / "tunesmith_config.yaml")]) == 0  # resumes automatically
    a = load_file(straight / "adapter_model.safetensors")
    b = load_file(stopped / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert logged(stopped) == logged(straight)


EXPECTED_TRAINABLE = {
    # hidden 32, intermediate 64, 2 layers, 4 heads of 8, 2 kv heads (k/v project to 16)
    "lora": 2 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4)),  # q_proj and v_proj, rank 4
    "freeze": 32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64 + 2 * 32,  # the last layer, all modules
}


@pytest.mark.parametrize("kind", ["lora", "freeze", "full"])
def test_each_method_trains_only_what_it_should(tmp_path, tiny_model_dir, data_dir, kind):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunesmith.config import load_config
    from tunesmith.model.adapters import apply_finetuning, parameter_counts

    cfg = load_config([f"model_name_or_path={tiny_model_dir}", f"finetuning_type={kind}", "lora_target=q_proj,v_proj",
                       "lora_rank=4", "freeze_trainable_layers=1"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    before = {n: p.clone() for n, p in base.named_parameters()}
    total = sum(p.numel() for p in base.parameters())
    model = apply_finetuning(base, cfg)
    trainable, _ = parameter_counts(model)
    assert trainable == EXPECTED_TRAINABLE.get(kind, total)
    out = train(tmp_path, tiny_model_dir, data_dir, f"m_{kind}", f"finetuning_type={kind}", "max_steps=2",
                "lora_target=q_proj,v_proj", "lora_rank=4", "freeze_trainable_layers=1")
    reloaded = AutoModelForCausalLM.from_pretrained(tiny_model_dir if kind == "lora" else out, dtype=torch.float32)
    if kind == "lora":
        reloaded = PeftModel.from_pretrained(reloaded, out).merge_and_unload()
    changed = {n for n, p in reloaded.named_parameters() if not torch.equal(p, before[n])}
    if kind == "lora":
        assert changed == {f"model.layers.{i}.self_attn.{m}.weight" for i in (0, 1) for m in ("q_proj", "v_proj")}
    elif kind == "freeze":
        assert changed and all(n.startswith("model.layers.1.") for n in changed)
    else:
        assert len(changed) == len(before)


def test_outputs_logs_and_plots(tmp_path, tiny_model_dir, data_dir):
    out = train(tmp_path, tiny_model_dir, data_dir, "full_out", "max_steps=4", "val_size=4", "eval_strategy=steps",
                "eval_steps=2", "plot_loss=true", "lora_target=all")
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "trainer_log.jsonl",
            "train_results.json", "eval_results.json", "all_results.json", "tunesmith_config.yaml",
            "tunesmith_template.json", "training_loss.png", "training_eval_loss.png"} <= names
    lines = [json.loads(l) for l in (out / "trainer_log.jsonl").read_text().splitlines()]
    train_line = lines[0]
    assert {"current_steps", "total_steps", "loss", "lr", "epoch", "grad_norm", "supervised_tokens_per_s",
            "elapsed_time", "remaining_time"} <= set(train_line)
    assert len([l for l in lines if "eval_loss" in l]) == 2
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(out)
    assert "<|im_start|>" in saved.chat_template


def test_load_best_model_at_end_picks_the_best_checkpoint(tmp_path, tiny_model_dir, data_dir):
    # greater_is_better on a falling eval loss makes an early checkpoint the best one, so the best is not the last.
    out = train(tmp_path, tiny_model_dir, data_dir, "best", "finetuning_type=full", "max_steps=8",
                "val_size=4", "eval_strategy=steps", "eval_steps=2", "save_strategy=steps", "save_steps=2",
                "load_best_model_at_end=true", "save_total_limit=1", "greater_is_better=true")
    evals = [l for l in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines()) if "eval_loss" in l]
    best = max(evals, key=lambda l: l["eval_loss"])
    assert best["current_steps"] < evals[-1]["current_steps"], "the test needs a best that is not the last"
    best_dir = out / f"checkpoint-{best['current_steps']}"
    assert best_dir.is_dir(), "the best checkpoint must survive rotation"
    final, chosen = load_file(out / "model.safetensors"), load_file(best_dir / "model.safetensors")
    assert all(torch.equal(final[k], chosen[k]) for k in final)
    assert json.loads((out / "eval_results.json").read_text())["eval_loss"] == pytest.approx(best["eval_loss"], rel=1e-4)


def test_a_killed_save_is_never_resumed(tmp_path, tiny_model_dir, data_dir, monkeypatch):
    args = ["finetuning_type=lora", "max_steps=4", "save_strategy=steps", "save_steps=2"]
    out = train(tmp_path, tiny_model_dir, data_dir, "killed", *args)
    calls = {"n": 0}
    original = ckpt.TrainerState.save

    def dies_on_second_checkpoint(self, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")  # dies while writing checkpoint-4
        original(self, path)

    shutil.rmtree(out)
    monkeypatch.setattr(ckpt.TrainerState, "save", dies_on_second_checkpoint)
    with pytest.raises(AssertionError):  # the command fails with a message (exit 1), see test_trust.py
        train(tmp_path, tiny_model_dir, data_dir, "killed", *args)
    assert not (out / "checkpoint-4.tmp-save").exists() and not (out / "checkpoint-4").exists()
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2"]
    # a save killed outright leaves its .tmp-save folder: never resumed from, removed by the next run
    (out / "checkpoint-4.tmp-save").mkdir()
    (out / "checkpoint-4.tmp-save" / ckpt.STATE_FILE).write_text("{}")
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2"]


def test_config_errors_exit_2(tmp_path, tiny_model_dir, data_dir, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    base = ["train", f"model_name_or_path={tiny_model_dir}", f"dataset_dir={data_dir}", "template=chatml"]
    assert main(base + ["dataset=sft", f"output_dir={busy}"]) == 2
    assert "is not empty and holds no complete checkpoint" in capsys.readouterr().err
    assert (busy / "notes.txt").read_text() == "mine"
    assert main(base + ["dataset=sft", f"output_dir={tmp_path / 'o'}", "fp16=true"]) == 2
    assert "`fp16` needs a CUDA GPU" in capsys.readouterr().err
    assert main(base + ["dataset=missing", f"output_dir={tmp_path / 'o'}"]) == 2
    assert "unknown dataset `missing`" in capsys.readouterr().err


def test_tensorboard_min_lr_schedule_and_additional_target(tmp_path, tiny_model_dir, data_dir):
    out = train(tmp_path, tiny_model_dir, data_dir, "tb", "max_steps=3", "report_to=tensorboard",
                "lr_scheduler_type=cosine_with_min_lr", "lr_scheduler_kwargs={min_lr_rate: 0.1}",
                "lora_target=q_proj", "additional_target=lm_head")
    assert list((out / "runs").glob("events.out.tfevents.*"))
    lrs = logged(out, "lr")
    assert lrs[-1] == pytest.approx(1e-3, rel=1e-6)  # the floor: 0.1 x 1e-2
    saved = load_file(out / "adapter_model.safetensors")
    assert any("lm_head" in k for k in saved), "additional_target modules are saved with the adapter"


def test_epoch_schedules_and_packing(tmp_path, tiny_model_dir, data_dir):
    out = train(tmp_path, tiny_model_dir, data_dir, "epochs", "num_train_epochs=2", "val_size=4",
                "eval_strategy=epoch", "save_strategy=epoch", "per_device_train_batch_size=4")
    lines = [json.loads(l) for l in (out / "trainer_log.jsonl").read_text().splitlines()]
    steps_per_epoch = 5  # 20 training samples / batch 4
    assert [l["current_steps"] for l in lines if "eval_loss" in l] == [steps_per_epoch, 2 * steps_per_epoch]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-5", "checkpoint-10"]
    packed = train(tmp_path, tiny_model_dir, data_dir, "packed", "stage=pt", "dataset=corpus", "packing=true",
                   "cutoff_len=64", "per_device_train_batch_size=1", "num_train_epochs=1")
    rows = [json.loads(l) for l in (packed / "trainer_log.jsonl").read_text().splitlines()]
    assert rows[-1]["total_steps"] < 24  # several short documents share each row of 64 tokens


def test_compute_accuracy_counts_argmax_hits(tmp_path, tiny_model_dir, data_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    from conftest import DATA_DIR, TINY_MODEL
    from tunesmith.config import load_config
    from tunesmith.data.batching import collate
    from tunesmith.data.pipeline import build_datasets
    from tunesmith.data.templates import load_template
    from tunesmith.train.loss import token_loss_sum

    # the pre-trained shipped model on real text, so that some next tokens are guessed right
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32).eval()
    cfg = load_config([f"model_name_or_path={TINY_MODEL}", "dataset=corpus_demo", f"dataset_dir={DATA_DIR}",
                       "stage=pt", "cutoff_len=64", "max_samples=6"])
    data = build_datasets(cfg, tokenizer, None, "text", use_cache=False).train
    batch = collate(data, [[i] for i in range(len(data))], True, 0)
    correct = []
    with torch.no_grad():
        token_loss_sum(model, batch, correct)
        expected = 0
        for i in range(len(data)):
            ids, labels = data[i]
            logits = model(input_ids=torch.tensor(ids[None], dtype=torch.long)).logits[0, :-1]
            target = torch.tensor(labels[1:], dtype=torch.long)
            expected += int(((logits.argmax(-1) == target) & (target != -100)).sum())
    assert int(correct[0]) == expected > 0
    out = train(tmp_path, tiny_model_dir, data_dir, "acc", "max_steps=2", "val_size=4", "do_train=true", "do_eval=true",
                "compute_accuracy=true")
    metrics = json.loads((out / "eval_results.json").read_text())
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and "eval_loss" in metrics


def test_bf16_lora_trains_like_fp32(tmp_path, tiny_model_dir, data_dir):
    """LoRA under bf16 autocast runs end to end (the start-up probes run under autocast as the loop does, with the
    adapters' inputs in half precision) and its losses follow the fp32 run's within bf16 rounding."""
    common = ("finetuning_type=lora", "lora_target=all", "max_steps=3")
    fp32 = logged(train(tmp_path, tiny_model_dir, data_dir, "fp32", *common))
    bf16 = logged(train(tmp_path, tiny_model_dir, data_dir, "bf16", *common, "bf16=true", "allow_slow_bf16=true"))
    assert len(fp32) == len(bf16) == 3
    assert all(abs(a - b) <= 0.03 * a for a, b in zip(fp32, bf16)), (fp32, bf16)
