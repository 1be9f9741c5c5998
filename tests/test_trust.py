"""What a first user (or a hostile file) hits: resume safety, located errors for bad input, the classic
do_train/do_eval/do_predict semantics, and bf16 on a CPU that lacks it."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY_MODEL, sft_rows, write_dataset
from tunesmith.cli import main
from tunesmith.train import checkpoint as ckpt


@pytest.fixture()
def data_dir(tmp_path):
    folder = tmp_path / "data"
    write_dataset(folder, "sft", sft_rows())
    return folder


def base_args(tmp_path, model_dir, data_dir, out):
    return ["train", f"model_name_or_path={model_dir}", f"dataset_dir={data_dir}", f"output_dir={out}",
            f"data_cache_dir={tmp_path / 'cache'}", "dataset=sft", "template=chatml", "cutoff_len=64",
            "per_device_train_batch_size=2", "learning_rate=1e-2", "lr_scheduler_type=constant", "logging_steps=1",
            "disable_tqdm=true", "seed=1", "lora_rank=4"]


class Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_refuses_a_pickled_payload_and_never_runs_it(tmp_path, tiny_model_dir, data_dir, capsys):
    out = tmp_path / "out"
    args = base_args(tmp_path, tiny_model_dir, data_dir, out) + ["max_steps=4", "save_steps=2"]
    assert main(args) == 0
    marker = tmp_path / "pwned"
    state = torch.load(out / "checkpoint-4" / "optimizer.pt", weights_only=True)
    state["payload"] = Payload(marker)
    with open(out / "checkpoint-4" / "optimizer.pt", "wb") as f:
        pickle.dump(state, f)  # torch.load reads plain pickles too
    capsys.readouterr()
    assert main(args[:-2] + ["max_steps=6", "save_steps=2"]) == 2
    err = capsys.readouterr().err
    assert "refusing to load" in err and "optimizer.pt" in err and "Traceback" not in err
    assert not marker.exists()


def test_incomplete_checkpoints_are_skipped_by_name_and_resume_is_announced(tmp_path, tiny_model_dir, data_dir,
                                                                           capsys):
    out = tmp_path / "out"
    args = base_args(tmp_path, tiny_model_dir, data_dir, out) + ["max_steps=4", "save_steps=2"]
    assert main(args) == 0
    # a deletion killed half way (the old code removed files one by one): state file kept, weights gone
    (out / "checkpoint-4" / "adapter_model.safetensors").unlink()
    (out / "checkpoint-6.tmp-delete").mkdir()
    with open(out / "trainer_log.jsonl", "a") as f:
        f.write('{"current_steps": 5, "lo')  # a crash mid-write
    capsys.readouterr()
    assert main(args[:-2] + ["max_steps=6", "save_steps=2"]) == 0
    err = capsys.readouterr().err
    assert "skipping" in err and "checkpoint-4" in err and "adapter_model.safetensors" in err
    assert "resuming from checkpoint-2 (step 2 of 6)" in err
    assert not (out / "checkpoint-6.tmp-delete").exists()
    lines = [json.loads(l) for l in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert [l["current_steps"] for l in lines if "loss" in l] == [1, 2, 3, 4, 5, 6]


def test_rotation_renames_before_deleting(tmp_path, monkeypatch):
    for step in (1, 2, 3):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name in (ckpt.STATE_FILE, "adapter_model.safetensors", "optimizer.pt", "scheduler.pt"):
            (folder / name).write_text("x")
    seen = []
    monkeypatch.setattr(ckpt.shutil, "rmtree", lambda path, **kw: seen.append(path.name))
    ckpt.rotate(tmp_path, 2, None)
    assert seen == ["checkpoint-1.tmp-delete"]  # the folder stopped being a checkpoint before any file went
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]


def test_a_full_disk_keeps_the_last_checkpoint_and_says_so(tmp_path, tiny_model_dir, data_dir, monkeypatch, capsys):
    import errno

    out = tmp_path / "out"
    args = base_args(tmp_path, tiny_model_dir, data_dir, out) + ["max_steps=4", "save_steps=2"]
    real = torch.save

    def fills_the_disk(obj, path, *a, **kw):
        if "checkpoint-4" in str(path):
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, *a, **kw)

    monkeypatch.setattr(torch, "save", fills_the_disk)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"no space left on {out}" in err and "checkpoint-2" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]


def test_ctrl_c_names_the_latest_checkpoint_and_the_resume_command(tmp_path, tiny_model_dir, data_dir, monkeypatch,
                                                                   capsys):
    from tunesmith.train import recipe

    out = tmp_path / "out"
    real = recipe.Trainer.after_step

    def interrupted(self, metrics, epoch_done, whole=True):
        real(self, metrics, epoch_done, whole)
        if self.state.global_step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(recipe.Trainer, "after_step", interrupted)
    assert main(base_args(tmp_path, tiny_model_dir, data_dir, out) + ["max_steps=6", "save_steps=2"]) == 130
    err = capsys.readouterr().err
    assert f"the latest checkpoint is {out / 'checkpoint-2'}" in err
    assert f"tunesmith train {out / 'tunesmith_config.yaml'}" in err


def test_the_saved_config_resumes_its_own_run_and_runs_never_mix(tmp_path, tiny_model_dir, data_dir, capsys):
    out = tmp_path / "out"
    args = base_args(tmp_path, tiny_model_dir, data_dir, out)
    assert main(args + ["max_steps=8", "save_steps=4"]) == 0  # an older run: checkpoints 4 and 8
    # a new run over it, killed after its first checkpoint
    assert main(args + ["max_steps=2", "save_steps=1", "overwrite_output_dir=true"]) == 0
    assert sorted(p.name for p in ckpt.list_checkpoints(out)) == ["checkpoint-1", "checkpoint-2"]
    saved = (out / "tunesmith_config.yaml").read_text()
    assert "overwrite_output_dir: false" in saved
    (out / "checkpoint-2").rename(out / "gone")
    capsys.readouterr()
    assert main(["train", str(out / "tunesmith_config.yaml")]) == 0
    assert "resuming from checkpoint-1 (step 1 of 2)" in capsys.readouterr().err


def test_a_non_finite_loss_stops_with_the_step(tmp_path, tiny_model_dir, data_dir, capsys):
    out = tmp_path / "out"
    code = main(base_args(tmp_path, tiny_model_dir, data_dir, out) + ["max_steps=6", "save_steps=2",
                                                                       "learning_rate=1e30", "max_grad_norm=0"])
    assert code == 1
    err = capsys.readouterr().err
    assert "the loss became" in err and "at step" in err


@pytest.mark.parametrize("setting, message", [
    ("learning_rate=.nan", "expected a finite number"),
    ("learning_rate=inf", "expected a finite number"),
    ("seed=-5", "`seed` must be between 0"),
    ("warmup_steps=-10", "`warmup_steps` must be >= 0"),
    ("lora_alpha=-5", "`lora_alpha` must be positive"),
    ("lora_rank=1000000000", "exceeds the model's hidden size"),
    ("output_dir=/proc/nope/out", "cannot be created"),
    ("model_name_or_path=/no/such/model", "the folder `/no/such/model` does not exist"),
    ("dataset=missing", "unknown dataset `missing`"),
])
def test_bad_settings_exit_2_before_torch_is_imported(tmp_path, data_dir, setting, message):
    """Each run in a fresh interpreter that must not import torch before reporting."""
    args = base_args(tmp_path, TINY_MODEL, data_dir, tmp_path / "out")[1:]
    code = ("import sys; from tunesmith.cli import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    result = subprocess.run([sys.executable, "-c", code, "train", *args, setting], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_invalid_utf8_everywhere_is_located(tmp_path, capsys):
    (tmp_path / "cfg.yaml").write_bytes(b"stage: sft\nlearning_rate: 1e-4\ntemplate: \xff\xfe\n")
    assert main(["train", str(tmp_path / "cfg.yaml")]) == 2
    assert "cfg.yaml, line 3: not UTF-8" in capsys.readouterr().err
    data = tmp_path / "data"
    write_dataset(data, "good", sft_rows(2), suffix=".jsonl")
    (data / "good.jsonl").write_bytes((data / "good.jsonl").read_bytes() + b'{"instruction": "\xff", "output": "x"}\n')
    common = ["data", f"model_name_or_path={TINY_MODEL}", f"dataset_dir={data}", "template=chatml",
              f"data_cache_dir={tmp_path / 'cache'}", "dataset=good"]
    assert main(common) == 2
    assert "good.jsonl, row 3: not UTF-8 text" in capsys.readouterr().err
    (data / "dataset_info.json").write_bytes(b'{"good": {"file_name": "\xe9.json"}}')
    assert main(common) == 2
    assert "dataset_info.json, row 1: not UTF-8 text" in capsys.readouterr().err


@pytest.mark.parametrize("name, rows, suffix, message", [
    ("null_instruction", [{"instruction": None, "output": "x"}], ".json", "field `instruction`: is null"),
    ("ragged", "instruction,output\nhi,there\nhow,are,you\n", ".csv", "row 2: has 3 fields where the header has 2"),
])
def test_rows_that_would_be_silently_changed_are_errors(tmp_path, name, rows, suffix, message, capsys):
    data = tmp_path / "data"
    write_dataset(data, name, rows, suffix=suffix)
    assert main(["data", f"model_name_or_path={TINY_MODEL}", f"dataset_dir={data}", "template=chatml",
                 f"data_cache_dir={tmp_path / 'cache'}", f"dataset={name}"]) == 2
    assert message in capsys.readouterr().err


def test_a_dangling_symlink_in_a_dataset_folder_is_named(tmp_path, capsys):
    data = tmp_path / "data"
    write_dataset(data, "folder", sft_rows(2))
    (data / "rows").mkdir()
    (data / "folder.json").rename(data / "rows" / "a.json")
    (data / "rows" / "b.json").symlink_to(tmp_path / "nowhere.json")
    info = json.loads((data / "dataset_info.json").read_text())
    info["folder"]["file_name"] = "rows"
    (data / "dataset_info.json").write_text(json.dumps(info))
    assert main(["data", f"model_name_or_path={TINY_MODEL}", f"dataset_dir={data}", "template=chatml",
                 f"data_cache_dir={tmp_path / 'cache'}", "dataset=folder"]) == 2
    assert "b.json: is a symbolic link" in capsys.readouterr().err


def test_an_adapter_folder_without_an_adapter_is_named(tmp_path, capsys):
    assert main(["predict", f"model_name_or_path={TINY_MODEL}", f"adapter_name_or_path={tmp_path}",
                 "dataset=alpaca_en_demo", f"output_dir={tmp_path / 'o'}"]) == 2
    assert "holds no LoRA adapter (no adapter_config.json)" in capsys.readouterr().err


def test_the_seed_predict_command_predicts_and_trains_nothing(tmp_path, tiny_model_dir, data_dir):
    adapter = tmp_path / "adapter"
    assert main(base_args(tmp_path, tiny_model_dir, data_dir, adapter) + ["max_steps=2", "save_strategy=no"]) == 0
    out = tmp_path / "pred"
    assert main(["train", "--stage", "sft", "--model_name_or_path", str(tiny_model_dir), "--do_predict",
                 "--dataset", "sft", "--dataset_dir", str(data_dir), "--template", "default", "--finetuning_type",
                 "lora", "--checkpoint_dir", str(adapter), "--output_dir", str(out), "--per_device_eval_batch_size",
                 "8", "--max_samples", "5", "--predict_with_generate", "--max_new_tokens", "4"]) == 0
    assert len((out / "generated_predictions.jsonl").read_text().splitlines()) == 5
    assert not (out / "adapter_model.safetensors").exists() and not (out / "trainer_log.jsonl").exists()


def test_do_eval_alone_evaluates_without_training(tmp_path, tiny_model_dir, data_dir):
    out = tmp_path / "eval"
    assert main(base_args(tmp_path, tiny_model_dir, data_dir, out) + ["--do_eval", "val_size=4"]) == 0
    assert "eval_loss" in json.loads((out / "eval_results.json").read_text())
    assert not (out / "trainer_log.jsonl").exists()


def test_bf16_on_a_cpu_without_it_computes_in_fp32_once_warned(tmp_path, tiny_model_dir, data_dir, monkeypatch,
                                                               capsys):
    from tunesmith import runtime

    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: False)
    out = tmp_path / "bf16"
    assert main(base_args(tmp_path, tiny_model_dir, data_dir, out) + ["max_steps=1", "save_strategy=no",
                                                                       "bf16=true"]) == 0
    err = capsys.readouterr().err
    assert err.count("no native bf16") == 1 and "allow_slow_bf16: true" in err
    assert "bf16: true" in (out / "tunesmith_config.yaml").read_text()  # the user's setting is kept for reruns
    from tunesmith.config import load_config
    from tunesmith.model.loading import inference_dtype

    assert inference_dtype(load_config([f"model_name_or_path={TINY_MODEL}"])) == torch.float32  # stored in bf16
    assert inference_dtype(load_config([f"model_name_or_path={TINY_MODEL}", "allow_slow_bf16=true"])) == "auto"
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda: True)
    assert inference_dtype(load_config([f"model_name_or_path={TINY_MODEL}", "infer_dtype=bfloat16"])) == torch.bfloat16


def test_the_thread_governor_follows_the_free_cores(monkeypatch):
    from tunesmith.train.cpu import threads as cpu_threads

    monkeypatch.setattr(cpu_threads.torch, "get_num_threads", lambda: threads[0])
    monkeypatch.setattr(cpu_threads.torch, "set_num_threads", lambda n: threads.__setitem__(0, n))
    monkeypatch.setattr(cpu_threads, "_machine", lambda: (0.0, 2))
    threads = [2]
    governor = cpu_threads.ThreadGovernor()
    # (wall s, machine busy CPU s, this process's CPU s): another process keeps one core busy, then goes idle
    samples = iter([(1.0, 2.0, 1.0), (2.0, 3.9, 1.9), (3.0, 4.8, 2.8), (3.5, 5.0, 3.0)])
    governor.last = (0.0, 0.0, 0.0)
    monkeypatch.setattr(governor, "_sample", lambda: next(samples))
    governor.after_step()
    assert threads == [1]  # 2 - 1 busy core elsewhere
    governor.after_step()
    assert threads == [1]  # still busy (1.9 - 0.9 = 1.0 core)
    governor.after_step()
    assert threads == [2]  # the other process went idle: all cores again
    governor.after_step()  # under WINDOW_S since the last reading: nothing changes
    assert threads == [2]
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu_threads.make_governor("cpu", 1, 1) is None  # the user's setting wins


def test_a_command_prints_no_foreign_warnings(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tunesmith.cli", "export", f"model_name_or_path={TINY_MODEL}",
                             f"export_dir={tmp_path / 'out'}", "template=chatml"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for noise in ("FutureWarning", "DeprecationWarning", "[WARNING]", "Loading weights"):
        assert noise not in result.stderr, result.stderr
