"""FSDP2 on 2 CPU processes (gloo): the same losses as one process with twice the batch, whole adapter and model
files gathered on rank 0 only, an exact resume from sharded optimizer state, and loading on rank 0 only."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, keep_only_checkpoint, write_dataset
from test_distributed import args_for, launch, losses, logged, torchrun
from test_train import sft_rows

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="multi-process tests run on Linux")


def quiet_env() -> dict:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture()
def data(tmp_path):
    write_dataset(tmp_path / "data", "sft", sft_rows(30))


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_fsdp_equals_one_process_and_saves_whole_files(tmp_path, tiny_model_dir, data, kind):
    common = [f"finetuning_type={kind}", "lora_target=all", "max_steps=4", "gradient_accumulation_steps=2",
              "max_grad_norm=0.5", "save_strategy=steps", "save_steps=2", "val_size=0.2", "eval_strategy=steps",
              "eval_steps=2"]  # evaluation between steps: forwards without a backward, then training goes on
    one, sharded = tmp_path / "one", tmp_path / "fsdp"
    launch([[sys.executable, "-m", "tunesmith.cli", *args_for(tmp_path, tiny_model_dir, one, *common,
                                                              "per_device_train_batch_size=4")]])
    run = subprocess.run(torchrun(2, args_for(tmp_path, tiny_model_dir, sharded, *common,
                                              "per_device_train_batch_size=2", "fsdp=full_shard")),
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=quiet_env())
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "head+loss chunked" in run.stdout + run.stderr  # the logits never exist whole under FSDP either
    assert len(losses(one)) == 4
    assert losses(sharded) == pytest.approx(losses(one), rel=1e-5, abs=1e-6)
    assert logged(sharded, "grad_norm") == pytest.approx(logged(one, "grad_norm"), rel=1e-4)
    assert len(logged(one, "eval_loss")) == 2
    assert logged(sharded, "eval_loss") == pytest.approx(logged(one, "eval_loss"), rel=1e-5)
    name = "adapter_model.safetensors" if kind == "lora" else "model.safetensors"
    for folder in ("", "checkpoint-2"):
        a, b = load_file(one / folder / name), load_file(sharded / folder / name)
        assert set(a) == set(b)  # whole tensors, the same keys (LoRA: the adapter's only)
        for key in a:
            assert a[key].shape == b[key].shape
            # Adam turns reduction-order noise in near-zero gradients into a few differences of a fraction of a
            # step (lr 1e-2) in single elements; a wrongly gathered tensor would differ by its whole size
            assert float((b[key] - a[key]).norm() / a[key].norm().clamp(min=1e-12)) < 1e-3, key
    ranks = sorted(p.name for p in (sharded / "checkpoint-2" / "fsdp").iterdir())
    assert ranks == ["optimizer_rank0.pt", "optimizer_rank1.pt"]
    assert not (sharded / "checkpoint-2" / "optimizer.pt").exists()
    if kind == "full":  # stopped after checkpoint-2 and resumed: exactly the straight run's end
        stopped = tmp_path / "stopped"
        shutil.copytree(sharded, stopped)
        saved = (stopped / "tunesmith_config.yaml").read_text().replace(str(sharded), str(stopped))
        (stopped / "tunesmith_config.yaml").write_text(saved)
        keep_only_checkpoint(stopped, "checkpoint-2")
        launch([torchrun(2, ["train", str(stopped / "tunesmith_config.yaml")])])
        a, b = load_file(sharded / "model.safetensors"), load_file(stopped / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert losses(stopped) == losses(sharded)


def test_fsdp_optimizer_state_of_another_process_count_is_refused(tmp_path):
    import torch.distributed as dist

    from test_distributed import free_port
    from tunesmith.config.loader import ConfigError
    from tunesmith.train.fsdp import OPTIMIZER_FOLDER, FSDPStepper

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        stepper = FSDPStepper.__new__(FSDPStepper)
        stepper.model = torch.nn.Linear(2, 2)
        with pytest.raises(ConfigError, match="was not saved by an fsdp run with this many processes"):
            stepper.load_optimizer(tmp_path)
        (tmp_path / OPTIMIZER_FOLDER).mkdir()
        torch.save({"world_size": 2, "state": {}}, tmp_path / OPTIMIZER_FOLDER / "optimizer_rank0.pt")
        with pytest.raises(ConfigError, match="saved by 2 fsdp processes and this run has 1: resume it with 2"):
            stepper.load_optimizer(tmp_path)
    finally:
        dist.destroy_process_group()


def test_fsdp_loads_weights_on_rank_0_only(tmp_path, tiny_model_dir):
    """Rank 1 builds the model on the meta device (no memory), then receives rank 0's weights into its shards."""
    script = tmp_path / "check.py"
    script.write_text(f"""
import torch, torch.distributed as dist
from tunesmith.config import load_config
from tunesmith.model.adapters import apply_finetuning
from tunesmith.train import fsdp
dist.init_process_group("gloo")
rank = dist.get_rank()
cfg = load_config(["model_name_or_path={tiny_model_dir}", "output_dir=o", "finetuning_type=lora", "fsdp=full_shard"])
model = fsdp.load_unsharded(cfg, torch.float32, lambda m: apply_finetuning(m, cfg), rank)
devices = {{p.device.type for p in model.parameters()}}
assert devices == ({{"cpu"}} if rank == 0 else {{"meta"}}), devices
full = {{k: v.clone() for k, v in model.state_dict().items()}} if rank == 0 else None
model = fsdp.shard(model, cfg, torch.device("cpu"))
local = sum(p.to_local().numel() for p in model.parameters())
total = sum(p.numel() for p in model.parameters())
assert local < total * 0.6, (local, total)  # each rank holds about half
from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions
gathered = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    assert set(gathered) == set(full)
    for k in full:
        assert torch.equal(gathered[k], full[k]), k
ids = torch.tensor([[1, 5, 9, 3]])
out = model(input_ids=ids).logits
outs = [torch.zeros_like(out) for _ in range(2)]
dist.all_gather(outs, out)
assert torch.equal(outs[0], outs[1])  # rotary buffers and weights arrived on rank 1
dist.barrier()  # neither side closes its connections while the other still uses them
dist.destroy_process_group()
print("ok", rank)
""")
    launch([[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]])


def test_fsdp_config_problems():
    from tunesmith.config import load_config
    from tunesmith.train.fsdp import problems

    cfg = load_config(["model_name_or_path=m", "output_dir=o", "stage=dpo", "fsdp=full_shard",
                       "finetuning_type=full", "deepspeed=x.json", "quantization_bit=4"])
    found = " | ".join(problems(cfg, 1))
    for part in ("does not run stage `dpo` with `finetuning_type: full`", "`fsdp` and `deepspeed`",
                 "`quantization_bit`", "this run has one"):
        assert part in found
    assert problems(load_config(["model_name_or_path=m", "output_dir=o", "fsdp=full_shard"]), 2) == []
    cfg = load_config(["model_name_or_path=m", "output_dir=o", "fsdp=no"])
    assert cfg.training.fsdp == "no"


def test_accelerate_fsdp_config_becomes_fsdp(monkeypatch):
    from tunesmith.config import load_config
    from tunesmith.train.fsdp import adopt_accelerate_fsdp

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    cfg = load_config(["model_name_or_path=m", "output_dir=o"])
    adopt_accelerate_fsdp(cfg)
    assert cfg.training.fsdp == "shard_grad_op"
    import os

    assert os.environ["ACCELERATE_USE_FSDP"] == "false"  # accelerate itself must not wrap the model again


def test_fsdp_bf16_with_gradient_checkpointing(tmp_path, tiny_model_dir, data):
    """bf16 (FSDP's mixed precision: bf16 compute, fp32 reduction) with gradient checkpointing of the sharded
    layers, in shard_grad_op mode (weights kept gathered from forward to backward): the losses of one process
    with twice the batch, within bf16 rounding."""
    common = ["finetuning_type=lora", "max_steps=2", "save_strategy=no", "bf16=true", "allow_slow_bf16=true",
              "gradient_checkpointing=true"]
    one, sharded = tmp_path / "one", tmp_path / "fsdp"
    launch([[sys.executable, "-m", "tunesmith.cli", *args_for(tmp_path, tiny_model_dir, one, *common,
                                                              "per_device_train_batch_size=4")]])
    launch([torchrun(2, args_for(tmp_path, tiny_model_dir, sharded, *common, "per_device_train_batch_size=2",
                                 "fsdp=shard_grad_op"))])
    assert len(losses(sharded)) == 2
    assert losses(sharded) == pytest.approx(losses(one), rel=1e-3)


@pytest.mark.parametrize("stage,dataset,metric", [("dpo", "preference_demo", "rewards/margins"),
                                                   ("kto", "kto_demo", "rewards/chosen")])
def test_fsdp_preference_stages_with_lora_equal_one_process(tmp_path, tiny_model_dir, stage, dataset, metric):
    """dpo and kto under fsdp: the reference is the sharded model with its adapter disabled."""
    from conftest import DATA_DIR

    def args(out, *extra):
        return ["train", f"model_name_or_path={tiny_model_dir}", f"dataset_dir={DATA_DIR}", f"dataset={dataset}",
                "max_samples=8", f"output_dir={out}", f"data_cache_dir={tmp_path / 'cache'}", "template=chatml",
                f"stage={stage}", "finetuning_type=lora", "lora_target=all", "cutoff_len=96", "max_steps=2",
                "learning_rate=1e-2", "logging_steps=1", "save_strategy=no", "disable_tqdm=true", "seed=1", *extra]

    one, sharded = tmp_path / "one", tmp_path / "fsdp"
    if stage == "kto":  # its KL estimate is a mean over each process's batch: compare with 2 data-parallel ones
        launch([torchrun(2, args(one, "per_device_train_batch_size=2"))])
    else:
        launch([[sys.executable, "-m", "tunesmith.cli", *args(one, "per_device_train_batch_size=4")]])
    launch([torchrun(2, args(sharded, "per_device_train_batch_size=2", "fsdp=full_shard"))])
    assert len(losses(one)) == 2
    assert losses(sharded) == pytest.approx(losses(one), rel=1e-5)
    assert logged(sharded, metric) == pytest.approx(logged(one, metric), rel=1e-4, abs=1e-6)


def test_fsdp_grpo_with_lora_samples_and_trains_as_data_parallel(tmp_path, tiny_model_dir, monkeypatch):
    """grpo under fsdp: generation is collective (a process whose answers are done keeps stepping with the
    others), and the same seeds give the same answers and losses as 2 data-parallel processes."""
    import os

    from conftest import DATA_DIR

    # a reward that differs between a random model's answers (they all run to max_new_tokens)
    (tmp_path / "chars_reward.py").write_text("def chars(prompts, completions, answers, **columns):\n"
                                              "    return [len(set(c)) / 10 for c in completions]\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")

    def args(out, *extra):
        return ["train", f"model_name_or_path={tiny_model_dir}", f"dataset_dir={DATA_DIR}", "dataset=arithmetic_demo",
                f"output_dir={out}", f"data_cache_dir={tmp_path / 'cache'}", "template=chatml", "stage=grpo",
                "finetuning_type=lora", "max_steps=2", "num_generations=3", "per_device_train_batch_size=1",
                "max_new_tokens=8", "reward_funcs=chars_reward:chars", "learning_rate=1e-2", "logging_steps=1",
                "pref_beta=0.1", "save_strategy=no", "disable_tqdm=true", "seed=1", *extra]

    ddp, sharded = tmp_path / "ddp", tmp_path / "fsdp"
    launch([torchrun(2, args(ddp))])
    launch([torchrun(2, args(sharded, "fsdp=full_shard"))])
    assert len(losses(ddp)) == 2
    assert logged(ddp, "grad_norm")[0] > 0 and logged(ddp, "kl")[1] > 0  # it trains, against the reference
    for key in ("loss", "reward", "answer_length", "kl", "grad_norm"):
        assert logged(sharded, key) == pytest.approx(logged(ddp, key), rel=1e-5, abs=1e-6), key
