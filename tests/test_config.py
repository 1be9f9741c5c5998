"""Config parsing: YAML, key=value overrides, --flags, aliases, types, and errors reported all at once."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT
from tunesmith.cli import main
from tunesmith.config import ConfigError, load_config
from tunesmith.config.loader import config_to_yaml
from tunesmith.config.validate import validate_for_train


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def test_yaml_then_overrides_then_flags(tmp_path):
    path = write(tmp_path, "learning_rate: 1.0e-4\nlora_target: q_proj,v_proj\ncutoff_len: 512\nbf16: true\n")
    cfg = load_config([path, "learning_rate=2e-4", "--cutoff_len", "256", "--bf16", "false", "--do_eval"])
    assert cfg.training.learning_rate == 2e-4
    assert cfg.data.cutoff_len == 256
    assert cfg.training.bf16 is False
    assert cfg.training.do_eval is True
    assert cfg.finetuning.lora_target == "q_proj,v_proj"


def test_yaml_numbers_written_as_text_are_accepted(tmp_path):
    # PyYAML reads `1e-4` (no dot) as a string; LLaMA-Factory users write it all the time.
    cfg = load_config([write(tmp_path, "learning_rate: 1e-4\nnum_train_epochs: 3\n")])
    assert cfg.training.learning_rate == 1e-4
    assert cfg.training.num_train_epochs == 3.0


def test_classic_flag_style_and_aliases():
    cfg = load_config(["--stage", "sft", "--do_train", "--model_name_or_path", "m", "--evaluation_strategy", "steps",
                       "--checkpoint_dir", "ckpt", "--lora_target", "all", "--flash_attn", "disabled",
                       "--per_device_train_batch_size=4"])
    assert cfg.training.eval_strategy == "steps"
    assert cfg.model.adapter_name_or_path == "ckpt"
    assert cfg.model.attn_implementation == "eager"
    assert cfg.training.per_device_train_batch_size == 4


def test_list_values_for_comma_keys(tmp_path):
    cfg = load_config([write(tmp_path, "lora_target: [q_proj, v_proj]\ndataset: [a, b]\n")])
    assert cfg.finetuning.lora_target == "q_proj,v_proj"
    assert cfg.data.dataset == "a,b"


def test_every_problem_is_reported_at_once(tmp_path):
    path = write(tmp_path, "lora_targt: all\nlearning_rate: fast\nstage: sftt\nrope_scaling: linear\n")
    with pytest.raises(ConfigError) as err:
        load_config([path, "cutoff_len=abc"])
    text = "\n".join(err.value.problems)
    assert len(err.value.problems) == 5
    assert "unknown key `lora_targt` (did you mean `lora_target`?)" in text
    assert "`learning_rate`: expected a finite number, got 'fast'" in text
    assert "`stage`: expected one of pt, sft, rm, dpo" in text
    assert "`rope_scaling` is not supported" in text
    assert "`cutoff_len`: expected an integer" in text


def test_impossible_combinations(tmp_path):
    cfg = load_config(["model_name_or_path=m", "dataset=d", "output_dir=o", "load_best_model_at_end=true",
                       "fp16=true", "predict_with_generate=true", "stage=pt"])
    with pytest.raises(ConfigError) as err:
        validate_for_train(cfg)
    text = "\n".join(err.value.problems)
    assert "`load_best_model_at_end` needs evaluation" in text
    assert "`fp16` needs a CUDA GPU" in text
    assert "`predict_with_generate` does not apply to `stage: pt`" in text


def test_load_best_needs_matching_schedule():
    cfg = load_config(["model_name_or_path=m", "dataset=d", "output_dir=o", "load_best_model_at_end=true",
                       "eval_strategy=steps", "eval_steps=10", "save_steps=15", "val_size=0.1"])
    with pytest.raises(ConfigError) as err:
        validate_for_train(cfg)
    assert any("multiple of `eval_steps`" in p for p in err.value.problems)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(["learning_rate=3e-4", "lr_scheduler_kwargs={min_lr_rate: 0.1}", "dataset=a,b"])
    path = write(tmp_path, config_to_yaml(cfg))
    again = load_config([path])
    assert again == cfg
    assert again.training.lr_scheduler_kwargs == {"min_lr_rate": 0.1}


def test_cli_exits_2_without_traceback(tmp_path, capsys):
    path = write(tmp_path, "lora_rnak: 8\n")
    assert main(["train", path]) == 2
    err = capsys.readouterr().err
    assert "did you mean `lora_rank`?" in err
    assert "Traceback" not in err


def test_cli_missing_required_fields(capsys):
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert "`model_name_or_path` is required" in err and "`dataset` is required" in err
    assert "`output_dir` is required" in err


def test_help_documents_every_field_with_default(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--lora_target [text, default 'all']" in out or "--lora_target [str, default 'all']" in out
    assert "(alias: evaluation_strategy)" in out
    assert "--cutoff_len [int, default 2048]" in out


def test_help_does_not_import_torch():
    code = "import sys; from tunesmith.cli import main; main(['--help']); main(['train', '--help']); " \
           "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


@pytest.mark.parametrize("command", ["train", "data", "predict", "eval", "export", "chat", "serve"])
def test_every_command_has_help(command, capsys):
    assert main([command, "--help"]) == 0
    assert f"usage: tunesmith {command}" in capsys.readouterr().out


def test_one_process_per_visible_gpu_unless_told_or_launched(monkeypatch):
    import torch

    from tunesmith.train.launch import processes_wanted

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert processes_wanted(load_config([])) == 4
    assert processes_wanted(load_config(["nproc_per_node=1"])) == 1
    monkeypatch.setenv("WORLD_SIZE", "4")  # inside the launched group: never start more
    assert processes_wanted(load_config([])) == 1


def test_llamafactory_keys_we_lack_are_named_and_inverted_switches_work(tmp_path):
    path = write(tmp_path, "mixture_of_depths: convert\nuse_cpu: true\ndisable_gradient_checkpointing: false\n")
    with pytest.raises(ConfigError) as err:
        load_config([path])
    assert err.value.problems == [f"{path}: `mixture_of_depths` is a LLaMA-Factory setting tunesmith does not "
                                  "support yet; remove it"]
    cfg = load_config([write(tmp_path, "use_cpu: true\nsave_only_model: true\ndisable_gradient_checkpointing: false\n")])
    assert cfg.training.gradient_checkpointing is True
    assert cfg.ignored_keys == ["save_only_model", "use_cpu"]  # named in the log by the CLI
    path = write(tmp_path, "fp8: true\nfp8_backend: te\nray_num_workers: 2\nplacement_strategy: PACK\n"
                           "enable_thinking: false\n")
    with pytest.raises(ConfigError) as err:
        load_config([path])
    assert [p.split("`")[1] for p in err.value.problems] == ["fp8", "fp8_backend", "ray_num_workers",
                                                             "placement_strategy"]
    assert all("is not supported" in p for p in err.value.problems)


def test_deepspeed_auto_values_filled_and_conflicts_named(tmp_path):
    import json

    from tunesmith.train.distributed import fill_deepspeed_config, load_deepspeed_config

    cfg = load_config(["per_device_train_batch_size=3", "gradient_accumulation_steps=2", "max_grad_norm=0.5",
                       "bf16=true", "model_name_or_path=m", "output_dir=o"])
    shipped = load_deepspeed_config(str(ROOT / "examples/deepspeed/ds_z2_config.json"))
    filled = fill_deepspeed_config(shipped, cfg, world=4, source="z2")
    assert (filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"],
            filled["train_batch_size"], filled["gradient_clipping"]) == (3, 2, 24, 0.5)
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    assert filled["zero_optimization"]["stage"] == 2
    with pytest.raises(ConfigError) as e:
        fill_deepspeed_config({"gradient_accumulation_steps": 4, "optimizer": {"type": "AdamW"}}, cfg, 1, "my.json")
    text = str(e.value)
    assert "my.json: remove the `optimizer` section" in text
    assert "`gradient_accumulation_steps` is 4 but the tunesmith config gives 2" in text
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2},}')
    with pytest.raises(ConfigError, match=r"bad.json line 1 column 36: invalid JSON"):
        load_deepspeed_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_deepspeed_config(str(tmp_path / "missing.json"))


def test_key_value_with_a_file_suffix_is_a_setting():
    cfg = load_config(["deepspeed=examples/deepspeed/ds_z2_config.json", "model_name_or_path=m"])
    assert cfg.training.deepspeed == "examples/deepspeed/ds_z2_config.json"


def test_the_settings_page_is_generated_from_the_dataclasses():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_keys_doc", ROOT / "scripts" / "make_keys_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "docs" / "llamafactory_keys.md").read_text(encoding="utf-8") == module.render(), \
        "docs/llamafactory_keys.md is stale: run python scripts/make_keys_doc.py"


def test_template_names_are_checked_with_the_config(tmp_path):
    from tunesmith.config.validate import check_model

    def problems(**model):
        cfg = load_config([write(tmp_path, "model_name_or_path: m\n" + "".join(f"{k}: {v}\n" for k, v in model.items()))])
        return check_model(cfg)

    assert problems(template="qwen3_nothink") == [] and problems(template="deepseekr1") == []
    [problem] = problems(template="qwen3_nothinking")
    assert problem.startswith("`template`: unknown template `qwen3_nothinking`") and "qwen3_nothink" in problem
    assert problems(template="missing.jinja") == ["`template`: template file `missing.jinja` not found"]
    assert "two tags" in problems(reasoning_tags="<think>")[0]
