"""Stage grpo: the objective against plain PyTorch on fixed answers (loss and gradients, with the clipped ratio
and the KL to a reference), reward functions and their errors, config checks, learning on the arithmetic demo,
and an exact resume with num_iterations."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA_DIR, TINY_MODEL, keep_only_checkpoint, write_dataset
from tunesmith.cli import main
from tunesmith.errors import StopError
from tunesmith.stages import rewards

PROMPTS = [{"instruction": f"What is {a} plus {b}?", "output": f"#### {a + b}"} for a, b in ((3, 4), (2, 5))]
ANSWERS = [["3 + 4 = 7\n#### 7", "3 + 4 = 8\n#### 8", "seven"], ["2 + 5 = 7\n#### 7", "#### 7", "2 + 5 = 7"]]


def setup_for(tmp_path, model_dir, *extra):
    from tunesmith.config import load_config
    from tunesmith.train.profile import choose_profile
    from tunesmith.train.setup import build_setup

    write_dataset(tmp_path / "data", "prompts", PROMPTS)
    cfg = load_config([f"model_name_or_path={model_dir}", f"dataset_dir={tmp_path / 'data'}", "dataset=prompts",
                       "template=chatml", "stage=grpo", f"output_dir={tmp_path / 'out'}", "num_generations=3",
                       "reward_funcs=regex_format,math_answer", "reward_weights=1,2", "max_new_tokens=12",
                       f"data_cache_dir={tmp_path / 'cache'}", *extra])
    (tmp_path / "out").mkdir()
    return build_setup(cfg, choose_profile(cfg))


def plain_logps(model, prompt, answer):
    ids = torch.tensor([prompt + answer])
    logits = model(input_ids=ids).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt) - 1: -1], -1)
    return logp.gather(-1, torch.tensor(answer)[:, None]).squeeze(-1)


def test_objective_equals_plain_pytorch(tmp_path, tiny_model_dir, tokenizer):
    """Full tuning, a perturbed frozen reference (KL not 0), num_iterations 2 and a policy moved after sampling
    (ratios away from 1, some clipped): loss and every gradient against a per-sequence PyTorch computation."""
    beta, eps = 0.2, 0.05
    s = setup_for(tmp_path, tiny_model_dir, "finetuning_type=full", f"pref_beta={beta}", f"grpo_epsilon={eps}",
                  "num_iterations=2")
    objective, model = s.objective, s.model
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    fixed = [tokenizer.encode(a, add_special_tokens=False) + ([end] if k < 2 else [])
             for group in ANSWERS for k, a in enumerate(group)]
    objective.sample = lambda prompts: [list(a) for a in fixed]
    torch.manual_seed(0)
    with torch.no_grad():
        for p in objective.reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sampler = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = objective.collate(s.data.train, [[0], [1]])
    with torch.no_grad():  # the policy moves between sampling and this step (as after a first iteration)
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.zero_grad()
    with torch.enable_grad():
        loss, metrics = objective.loss_sum(model, batch)
        loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    policy.load_state_dict({n: p.detach().clone() for n, p in model.named_parameters()}, strict=False)
    old = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    old.load_state_dict(sampler, strict=False)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference.load_state_dict({n: p.detach().clone() for n, p in objective.reference.named_parameters()},
                              strict=False)
    prompts = [s.data.train.prompt_ids(i) for i in (0, 1) for _ in range(3)]
    texts = [a for group in ANSWERS for a in group]
    refs = [PROMPTS[i]["output"] for i in (0, 1) for _ in range(3)]
    reward = torch.tensor([float(bool(__import__("re").search(r"####\s*-?\d+\s*$", t)))
                           + 2 * float(rewards.final_number(t) == rewards.final_number(r)) for t, r in zip(texts, refs)])
    groups = reward.view(2, 3)
    adv = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).view(-1)
    policy.zero_grad()
    total = 0
    for k, (prompt, answer) in enumerate(zip(prompts, fixed)):
        logp = plain_logps(policy, prompt, answer)
        with torch.no_grad():
            before, ref = plain_logps(old, prompt, answer), plain_logps(reference, prompt, answer)
        ratio = torch.exp(logp - before)
        per_token = -torch.min(ratio * adv[k], ratio.clamp(1 - eps, 1 + eps) * adv[k])
        per_token = per_token + beta * (torch.exp(ref - logp) - (ref - logp) - 1)
        total = total + per_token.sum()
    total.backward()
    assert float(loss) == pytest.approx(float(total), rel=1e-5)
    assert float(metrics["clip_ratio"]) > 0 and float(metrics["kl"]) > 0
    assert float(metrics["reward"]) == pytest.approx(float(reward.sum()))
    for name, p in policy.named_parameters():
        assert torch.allclose(got[name], p.grad, rtol=1e-4, atol=1e-6), name


def test_built_in_rewards():
    answers = ["#### 12", "#### 12", None, "The answer is 3."]
    completions = ["5 + 7 = 12\n#### 12", "#### 1,2", "anything", "so 3"]
    assert rewards.math_answer([], completions, answers) == [1.0, 1.0, 0.0, 1.0]
    assert rewards.exact_match([], ["#### 12 ", "x"], ["#### 12", "y"]) == [1.0, 0.0]
    assert rewards.make_regex_format(r"####\s*\d+$")([], completions, answers) == [1.0, 0.0, 0.0, 0.0]
    penalty = rewards.make_length_penalty(10, lambda text: len(text.split()))
    assert penalty([], ["a b", "a " * 20], [None, None]) == [-0.2, -1.0]


def test_user_reward_functions_and_their_errors(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(prompts, completions, answers, **columns):\n"
        "    return [1.0 / (1 + len(c)) + (columns['bonus'][i] or 0) for i, c in enumerate(completions)]\n"
        "def broken(prompts, completions, answers, **columns):\n    raise KeyError('answer')\n"
        "def short(prompts, completions, answers, **columns):\n    return [1.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    funcs = rewards.load_reward_funcs("my_rewards:brevity", None, "", 8, len)
    assert rewards.score(funcs, ["p", "p"], ["ab", ""], [None, None], {"bonus": [0, 2]}) == \
        {"my_rewards:brevity": [1 / 3, 3.0]}
    with pytest.raises(StopError, match=r"(?s)`my_rewards:broken` raised KeyError.*'ab'"):
        rewards.score(rewards.load_reward_funcs("my_rewards:broken", None, "", 8, len), ["p", "p"], ["ab", "c"],
                      [None, None], {})
    with pytest.raises(StopError, match="one number per completion"):
        rewards.score(rewards.load_reward_funcs("my_rewards:short", None, "", 8, len), ["p", "p"], ["a", "b"],
                      [None, None], {})
    with pytest.raises(StopError, match="cannot import"):
        rewards.load_reward_funcs("no_such_module:f", None, "", 8, len)


def test_config_problems_are_reported_before_loading(tmp_path, capsys):
    args = ["train", f"model_name_or_path={TINY_MODEL}", f"dataset_dir={DATA_DIR}", "dataset=arithmetic_demo",
            "template=chatml", "stage=grpo", f"output_dir={tmp_path / 'o'}", "num_generations=1",
            "reward_funcs=math_answer,nonsense", "reward_weights=1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "num_generations` must be at least 2" in err and "`nonsense` is neither a built-in" in err
    assert "has 1 weights for 2 reward functions" in err


def train(tmp_path, model, name, *extra):
    out = tmp_path / name
    args = ["train", f"model_name_or_path={model}", f"dataset_dir={DATA_DIR}", "dataset=arithmetic_demo",
            "template=chatml", f"output_dir={out}", f"data_cache_dir={tmp_path / 'cache'}", "disable_tqdm=true",
            "save_strategy=no", *extra]
    assert main(args) == 0
    return out


def test_grpo_raises_the_format_reward_after_a_short_sft(tmp_path):
    sft = train(tmp_path, TINY_MODEL, "sft", "finetuning_type=full", "max_steps=150", "learning_rate=3e-3",
                "per_device_train_batch_size=16")
    out = train(tmp_path, sft, "grpo", "stage=grpo", "max_steps=30", "logging_steps=5", "num_generations=8",
                "per_device_train_batch_size=4", "max_new_tokens=24", "temperature=0.8", "top_p=1.0",
                "learning_rate=1e-3", "lora_target=all", "lora_rank=16", "pref_beta=0.04",
                "reward_funcs=regex_format,math_answer")
    log = [json.loads(l) for l in (out / "trainer_log.jsonl").read_text().splitlines()]
    fmt = [l["rewards/regex_format"] for l in log if "rewards/regex_format" in l]
    assert fmt[0] < 0.8 and fmt[-1] > 0.9 and log[-1]["reward"] > log[0]["reward"]
    samples = [json.loads(l) for l in (out / "completions.jsonl").read_text().splitlines()]
    assert len(samples) >= 8 and {"prompt", "answer", "reward", "regex_format", "math_answer"} <= set(samples[0])


def test_resume_with_num_iterations_is_exact(tmp_path, tiny_model_dir):
    common = ["stage=grpo", "max_steps=6", "num_generations=3", "num_iterations=2", "per_device_train_batch_size=2",
              "max_new_tokens=8", "reward_funcs=length_penalty", "save_strategy=steps", "save_steps=3",
              "logging_steps=1", "learning_rate=1e-2", "lora_dropout=0.0"]
    straight = train(tmp_path, tiny_model_dir, "straight", *common)
    stopped = train(tmp_path, tiny_model_dir, "stopped", *common)
    kept = sorted(p.name for p in stopped.iterdir() if p.name.startswith("checkpoint-"))
    assert kept == ["checkpoint-4", "checkpoint-6"]  # the save due at step 3 waits for its batch's 2nd step
    keep_only_checkpoint(stopped, "checkpoint-4")
    assert main(["train", str(stopped / "tunesmith_config.yaml")]) == 0
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(stopped / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[next(iter(a))], torch.zeros_like(a[next(iter(a))]))


def test_freeze_tuning_trains_the_last_layer_only(tmp_path, tiny_model_dir):
    out = train(tmp_path, tiny_model_dir, "freeze", "stage=grpo", "finetuning_type=freeze", "freeze_trainable_layers=1",
                "max_steps=2", "num_generations=3", "per_device_train_batch_size=2", "max_new_tokens=8",
                "reward_funcs=regex_format", "reward_regex=[aeiou]", "learning_rate=1e-2", "pref_beta=0.1")
    base, tuned = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed and all(k.startswith("model.layers.1.") for k in changed)


def test_lora_old_logps_keep_the_adapter_and_the_reference_drops_it(tmp_path, tiny_model_dir, tokenizer):
    """With LoRA the reference is the same model with its adapter disabled; the sampling policy's log-probabilities
    (num_iterations > 1) must be taken with the adapter on."""
    from tunesmith.train.objectives import token_logps

    s = setup_for(tmp_path, tiny_model_dir, "num_iterations=2", "pref_beta=0.1")
    objective, model = s.objective, s.model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter: policy and reference now differ
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    objective.sample = lambda prompts: [tokenizer.encode("3 + 4 = 7", add_special_tokens=False) + [end]
                                        for _ in prompts]
    batch = objective.collate(s.data.train, [[0], [1]])
    model.eval()
    with torch.no_grad():
        policy = token_logps(model, batch.seqs)[0]
        with model.disable_adapter():
            reference = token_logps(model, batch.seqs)[0]
    assert not torch.allclose(policy, reference, atol=1e-3)
    assert torch.allclose(batch.old_logps, policy, atol=1e-5) and torch.allclose(batch.ref_logps, reference, atol=1e-5)


def stand_in_vllm(record: dict) -> dict:
    """Plain-Python stand-ins for the vllm modules (vLLM itself needs a CUDA GPU): they record how grpo drives
    vLLM and answer with seeded random tokens, some stopped by the end-of-turn token."""
    import random
    import types

    class LLM:
        def __init__(self, **kwargs):
            record["engine"] = kwargs

        def generate(self, requests, params, lora_request=None, use_tqdm=True):
            weights = load_file(f"{lora_request.lora_path}/adapter_model.safetensors")
            record.setdefault("adapters", []).append((lora_request.lora_int_id, lora_request.lora_path,
                                                      sum(float(v.abs().sum()) for k, v in weights.items()
                                                          if "lora_B" in k)))
            record.setdefault("seeds", []).extend(p.seed for p in params)
            outputs = []
            for request, p in zip(requests, params):
                assert request["prompt_token_ids"] and p.max_tokens == 8
                rng = random.Random(p.seed)
                ids = [rng.randrange(10, 200) for _ in range(rng.randrange(1, p.max_tokens))]
                stop = p.stop_token_ids[0]
                if rng.random() < 0.5:  # stopped at the end of turn; vLLM may leave the stop token out of token_ids
                    out = types.SimpleNamespace(token_ids=ids, finish_reason="stop", stop_reason=stop)
                else:
                    out = types.SimpleNamespace(token_ids=ids + [0] * (p.max_tokens - len(ids)),
                                                finish_reason="length", stop_reason=None)
                outputs.append(types.SimpleNamespace(outputs=[out]))
            return outputs

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)
            record["sampling"] = kwargs

    class LoRARequest:
        def __init__(self, name, lora_int_id, lora_path):
            self.lora_name, self.lora_int_id, self.lora_path = name, lora_int_id, lora_path

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest
    return {"vllm": vllm, "vllm.lora": types.ModuleType("vllm.lora"), "vllm.lora.request": request}


def test_vllm_rollouts_get_the_current_adapter_each_time(tmp_path, tiny_model_dir, monkeypatch):
    import sys
    from pathlib import Path

    record: dict = {}
    for name, module in stand_in_vllm(record).items():
        monkeypatch.setitem(sys.modules, name, module)
    out = train(tmp_path, tiny_model_dir, "grpo", "stage=grpo", "infer_backend=vllm", "vllm_gpu_util=0.3",
                "max_steps=4", "num_generations=4", "per_device_train_batch_size=2", "max_new_tokens=8",
                "reward_funcs=length_penalty", "learning_rate=1e-2", "logging_steps=1", "temperature=0.7")
    engine = record["engine"]
    assert engine["model"] == str(tiny_model_dir) and engine["enable_lora"] and engine["max_lora_rank"] == 16
    assert engine["gpu_memory_utilization"] == 0.3 and engine["tensor_parallel_size"] == 1
    sampling = record["sampling"]
    assert sampling["temperature"] == 0.7 and sampling["stop_token_ids"] and sampling["max_tokens"] == 8
    ids = [a[0] for a in record["adapters"]]
    assert ids == [1, 2, 3, 4]  # one rollout per step, each a new adapter id
    lora_b = [a[2] for a in record["adapters"]]
    assert lora_b[0] == 0 and all(b > 0 for b in lora_b[1:])  # the policy as trained so far: B starts at zero
    assert len(set(lora_b)) == 4
    assert [Path(a[1]).exists() for a in record["adapters"]] == [False, False, False, True]  # old ones removed
    assert len(record["seeds"]) == len(set(record["seeds"])) == 4 * 8  # every answer its own seed
    log = [json.loads(l) for l in (out / "trainer_log.jsonl").read_text().splitlines() if '"loss"' in l]
    assert len(log) == 4 and all(l["answer_length"] >= 1 for l in log)


def test_vllm_rollouts_config_problems(tmp_path, capsys):
    args = ["train", f"model_name_or_path={TINY_MODEL}", f"dataset_dir={DATA_DIR}", "dataset=arithmetic_demo",
            "template=chatml", "stage=grpo", f"output_dir={tmp_path / 'o'}", "infer_backend=vllm",
            "finetuning_type=full"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "needs `finetuning_type: lora`" in err and "`vllm_gpu_util` is 0.9" in err


def test_vllm_answers_end_with_the_stop_token_they_stopped_at():
    from types import SimpleNamespace as Out

    from tunesmith.infer.vllm_rollouts import with_stop_token

    assert with_stop_token(Out(token_ids=[5, 6], finish_reason="stop", stop_reason=2)) == [5, 6, 2]
    assert with_stop_token(Out(token_ids=[5, 2], finish_reason="stop", stop_reason=2)) == [5, 2]
    assert with_stop_token(Out(token_ids=[5, 6], finish_reason="length", stop_reason=None)) == [5, 6]
    assert with_stop_token(Out(token_ids=[5, 6], finish_reason="stop", stop_reason="</s>")) == [5, 6]
