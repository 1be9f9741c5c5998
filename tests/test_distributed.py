"""Several processes on this CPU (gloo): 2 ranks x batch b equal 1 rank x batch 2b; resume across ranks; two
"nodes" on 127.0.0.1."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, keep_only_checkpoint, write_dataset
from test_train import sft_rows

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="multi-process tests run on Linux")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def args_for(tmp_path, model_dir, out, *extra):
    return ["train", f"model_name_or_path={model_dir}", f"dataset_dir={tmp_path / 'data'}", f"output_dir={out}",
            f"data_cache_dir={tmp_path / 'cache'}", "dataset=sft", "template=chatml", "cutoff_len=64",
            "learning_rate=1e-2", "lr_scheduler_type=constant", "logging_steps=1", "save_strategy=no",
            "disable_tqdm=true", "seed=1", *extra]


def launch(cmds: list[list[str]], timeout: int = 300) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]


def torchrun(nproc: int, train_args: list[str], nnodes: int = 1, node_rank: int = 0, port: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}"]
    if nnodes > 1:
        cmd += [f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", "tunesmith.cli", *train_args]


def logged(out, key):
    return [json.loads(l)[key] for l in (out / "trainer_log.jsonl").read_text().splitlines() if f'"{key}"' in l]


def losses(out):
    return logged(out, "loss")


@pytest.fixture()
def data(tmp_path):
    write_dataset(tmp_path / "data", "sft", sft_rows(30))  # 30 samples: the last step has an uneven split


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_two_ranks_equal_one_rank_with_twice_the_batch(tmp_path, tiny_model_dir, data, kind):
    extra = [f"finetuning_type={kind}", "num_train_epochs=1", "lora_target=all"]
    one, two = tmp_path / "one", tmp_path / "two"
    launch([[sys.executable, "-m", "tunesmith.cli", *args_for(tmp_path, tiny_model_dir, one, *extra,
                                                              "per_device_train_batch_size=4")]])
    # the 2-rank run also cuts micro-batches into passes of <= 40 tokens: ranks then run different numbers of
    # passes (padded to the same count), which must change nothing
    two_args = args_for(tmp_path, tiny_model_dir, two, *extra, "per_device_train_batch_size=2",
                        "max_tokens_per_forward=40")
    if kind == "lora":  # a plain `tunesmith train` with nproc_per_node starts torchrun itself
        launch([[sys.executable, "-m", "tunesmith.cli", *two_args, "nproc_per_node=2"]])
    else:
        launch([torchrun(2, two_args)])
    assert len(losses(one)) == 8  # ceil(30 / 4) steps, the last one with 2 samples
    assert losses(two) == pytest.approx(losses(one), rel=1e-5, abs=1e-6)


def test_two_rank_resume_and_two_nodes(tmp_path, tiny_model_dir, data):
    common = ["finetuning_type=lora", "max_steps=4", "save_strategy=steps", "save_steps=2", "lora_dropout=0.1",
              "per_device_train_batch_size=2"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    launch([torchrun(2, args_for(tmp_path, tiny_model_dir, straight, *common))])
    # the run "stopped" after checkpoint-2: the straight run's folder cut back to that checkpoint (runs are
    # deterministic, so a second identical run would write the same files)
    shutil.copytree(straight, stopped)
    saved = (stopped / "tunesmith_config.yaml").read_text().replace(str(straight), str(stopped))
    (stopped / "tunesmith_config.yaml").write_text(saved)
    assert {p.name for p in (stopped / "checkpoint-2").glob("rng_state_*.pth")} == {"rng_state_0.pth",
                                                                                   "rng_state_1.pth"}
    keep_only_checkpoint(stopped, "checkpoint-2")
    launch([torchrun(2, ["train", str(stopped / "tunesmith_config.yaml")])])
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(stopped / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # two "nodes" of one process each on 127.0.0.1 train together like the 2-rank run
    nodes = tmp_path / "nodes"
    port = free_port()
    launch([torchrun(1, args_for(tmp_path, tiny_model_dir, nodes, *common), nnodes=2, node_rank=r, port=port)
            for r in (0, 1)])
    assert losses(nodes) == pytest.approx(losses(straight), rel=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_zero2_matches_ddp_resumes_and_exports(tmp_path, tiny_model_dir, data):
    """ZeRO-2 on 2 CPU processes: the same losses as one process with twice the batch, a resume from its
    sharded checkpoint ends where the straight run does, and the checkpoint exports like any other."""
    common = ["finetuning_type=lora", "lora_target=all", "max_steps=4", "gradient_accumulation_steps=2",
              "max_grad_norm=1.0"]
    one, zero2 = tmp_path / "one", tmp_path / "zero2"
    launch([[sys.executable, "-m", "tunesmith.cli", *args_for(tmp_path, tiny_model_dir, one, *common,
                                                              "per_device_train_batch_size=4")]])
    ds = ["deepspeed=examples/deepspeed/ds_z2_config.json", "per_device_train_batch_size=2"]
    launch([torchrun(2, args_for(tmp_path, tiny_model_dir, zero2, *common, *ds, "save_strategy=steps",
                                 "save_steps=2"))])
    assert losses(zero2) == pytest.approx(losses(one), rel=1e-5, abs=1e-6)
    # Adam hides a constant gradient scale from the losses; the norms show it
    assert logged(zero2, "grad_norm") == pytest.approx(logged(one, "grad_norm"), rel=1e-4)
    shards = {p.name for p in (zero2 / "checkpoint-2" / "deepspeed").iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= shards

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(zero2 / "checkpoint-2", resumed / "checkpoint-2")
    launch([torchrun(2, args_for(tmp_path, tiny_model_dir, resumed, *common, *ds, "save_strategy=steps",
                                 "save_steps=2"))])
    a, b = load_file(zero2 / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
    assert losses(resumed) == pytest.approx(losses(zero2)[2:], rel=1e-5)

    merged = tmp_path / "merged"
    launch([[sys.executable, "-m", "tunesmith.cli", "export", f"model_name_or_path={tiny_model_dir}",
             f"adapter_name_or_path={zero2 / 'checkpoint-4'}", f"export_dir={merged}", "template=chatml",
             "--verify"]])
    assert (merged / "model.safetensors").is_file()


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
@pytest.mark.parametrize("kind", ["lora", "full"])
def test_deepspeed_zero3_shards_weights_and_saves_them_whole(tmp_path, tiny_model_dir, data, kind):
    """ZeRO-3 partitions the weights themselves (from loading on): training still equals one process with twice
    the batch, and the saved adapter (LoRA: trainable tensors only) or model (full: gathered module by module to
    rank 0) is the whole, gathered tensors."""
    common = [f"finetuning_type={kind}", "lora_target=all", "max_steps=3"]
    one, zero3 = tmp_path / "one", tmp_path / "zero3"
    launch([[sys.executable, "-m", "tunesmith.cli", *args_for(tmp_path, tiny_model_dir, one, *common,
                                                              "per_device_train_batch_size=4")]])
    launch([torchrun(2, args_for(tmp_path, tiny_model_dir, zero3, *common, "per_device_train_batch_size=2",
                                 "deepspeed=examples/deepspeed/ds_z3_config.json"))])
    assert losses(zero3) == pytest.approx(losses(one), rel=1e-5, abs=1e-6)
    file = "adapter_model.safetensors" if kind == "lora" else "model.safetensors"
    a, b = load_file(one / file), load_file(zero3 / file)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape
        # Adam, lr 1e-2: reduction-order rounding grows in single elements of near-zero gradients
        assert float((a[name] - b[name]).norm() / a[name].norm().clamp(min=1e-12)) < 1e-3, name
