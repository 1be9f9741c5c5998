"""grpo: group relative policy optimisation, reinforcement learning from reward functions (stages/rewards.py).

For each prompt of a micro-batch the policy samples `num_generations` answers (the hf engine on the policy as it
is now, or vLLM with the policy's LoRA adapter handed over before each rollout: `infer_backend: vllm`; sampling
with `temperature`/`top_p`/`top_k`, at most `max_new_tokens`, the end-of-turn token kept so that stopping is
learnt). Each answer's reward is the weighted sum of the reward functions; its advantage is the
reward minus its group's mean, over the group's standard deviation (+1e-4). On every answer token t:

    ratio_t = pi(t) / pi_old(t)
    loss_t  = -min(ratio_t * A, clip(ratio_t, 1 - grpo_epsilon, 1 + grpo_epsilon) * A) + pref_beta * kl_t
    kl_t    = exp(ref_t - logpi_t) - (ref_t - logpi_t) - 1      (the k3 estimator, >= 0)

and the loss is the mean over every answer token of the step (each token weighs the same, whichever answer it
belongs to: DAPO's token-level normalisation, tunesmith's token-weighted mean across accumulation and ranks).
With `num_iterations: n` the same answers train n optimizer steps; pi_old is the policy that sampled them (with
n = 1, pi_old = pi and the ratio is 1). `pref_beta: 0` keeps no reference. The reference is the model with its
adapter disabled (LoRA) or a frozen copy (full/freeze). Checkpoints are written when a batch's n steps are done.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tunesmith.config.fields import Config
from tunesmith.stages.base import Stage


def check(cfg: Config) -> list[str]:
    from tunesmith.stages.rewards import check_names

    f, problems = cfg.finetuning, []
    if cfg.data.packing:
        problems.append("`packing` does not apply to `stage: grpo` (answers are generated per prompt)")
    if f.num_generations < 2:
        problems.append(f"`num_generations` must be at least 2 (advantages compare a prompt's answers), got "
                        f"{f.num_generations}")
    if f.num_iterations < 1:
        problems.append(f"`num_iterations` must be at least 1, got {f.num_iterations}")
    if f.grpo_epsilon <= 0:
        problems.append(f"`grpo_epsilon` must be positive, got {f.grpo_epsilon}")
    if f.pref_beta < 0:
        problems.append(f"`pref_beta` must be 0 or more for grpo, got {f.pref_beta}")
    if f.precompute_ref:
        problems.append("`precompute_ref` does not apply to `stage: grpo` (its answers are new at every step)")
    if cfg.model.infer_backend == "vllm":
        from tunesmith.infer.vllm_rollouts import problems as vllm_problems

        problems += vllm_problems(cfg)
    return problems + check_names(f.reward_funcs, f.reward_weights, f.reward_regex)


def build(inputs: Any) -> tuple[Any, Any]:
    import copy

    from tunesmith.stages.rewards import load_reward_funcs

    cfg, f, data = inputs.cfg, inputs.cfg.finetuning, inputs.data
    inputs.use_chunked_head()
    budget = cfg.generation.max_new_tokens * f.num_generations
    for part in (data.train, data.eval):
        if part is not None:
            part.completion_budget = budget
    reference = None
    if f.pref_beta > 0:
        reference = inputs.model if f.finetuning_type == "lora" else \
            copy.deepcopy(inputs.model).eval().requires_grad_(False)
    tokenizer = inputs.tokenizer
    funcs = load_reward_funcs(f.reward_funcs, f.reward_weights, f.reward_regex, cfg.generation.max_new_tokens,
                              lambda text: len(tokenizer.encode(text, add_special_tokens=False)))
    out = Path(cfg.training.output_dir) if inputs.accelerator.is_main_process else None  # type: ignore[arg-type]
    return inputs.model, GRPOObjective(inputs.model, tokenizer, inputs.template, cfg, reference, funcs,
                                       inputs.accelerator, out)


@dataclass
class Rollouts:
    """A micro-batch of sampled answers, ready to train on."""

    seqs: Any                 # PairBatch: prompt + answer sequences, targets on the answer tokens
    advantages: Any           # [sequences]
    old_logps: Any            # [answer tokens] of the sampling policy, or None (num_iterations 1)
    ref_logps: Any            # [answer tokens] of the reference, or None (pref_beta 0)
    sums: dict[str, float]    # metric sums over the answers (rewards, lengths, group std)

    @property
    def n_tokens(self) -> int:
        return self.seqs.n_tokens

    @property
    def n_targets(self) -> int:
        from tunesmith.data.encode import IGNORE

        return int((self.seqs.targets != IGNORE).sum())

    def to(self, device: Any) -> "Rollouts":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, seqs=self.seqs.to(device), advantages=move(self.advantages),
                       old_logps=move(self.old_logps), ref_logps=move(self.ref_logps))


class GRPOObjective:
    unit = "answer_tokens"
    hidden_metrics = ("count/answers",)

    def __init__(self, model: Any, tokenizer: Any, template: Any, cfg: Config, reference: Any, funcs: list,
                 accelerator: Any, out: Path | None):
        from tunesmith.infer.hf import HFEngine

        f, g = cfg.finetuning, cfg.generation
        self.model, self.tokenizer, self.reference, self.funcs, self.acc = model, tokenizer, reference, funcs, accelerator
        self.lora_reference = reference is model
        self.group, self.iterations, self.epsilon, self.beta = f.num_generations, f.num_iterations, f.grpo_epsilon, \
            f.pref_beta
        self.engine = HFEngine(model, tokenizer, template.stop if template else [],
                               replace(g, do_sample=True, num_beams=1))
        self.vllm = None  # or vLLM rollouts with the policy's adapter handed over each time (infer/vllm_rollouts.py)
        if cfg.model.infer_backend == "vllm":
            from tunesmith.infer.vllm_rollouts import VLLMRollouts

            self.vllm = VLLMRollouts(cfg, model, list(self.engine.config.eos_token_id))
        self.completions_file = out / "completions.jsonl" if out is not None else None
        self.log_every = max(1, cfg.training.logging_steps)
        self.cache: dict[Any, list] = {}  # units -> [rollouts, uses left] while num_iterations > 1
        self.rollout_count = 0
        names = [f"rewards/{name}" for name, _, _ in funcs]
        self.metric_names = ("loss", "reward", "reward_std", *names, "answer_length", "clip_ratio", "kl",
                             "count/answers")
        self.metric_per = {name: "count/answers" for name in ("reward", "reward_std", *names, "answer_length")}

    def count(self, batch: Rollouts) -> int:
        return batch.n_targets

    def collate(self, data: Any, units: list[list[int]]) -> Rollouts:
        key = (data.split, tuple(i for unit in units for i in unit))
        if key in self.cache:
            entry = self.cache[key]
            entry[1] -= 1
            if entry[1] <= 0:
                del self.cache[key]
            return entry[0]
        rollouts = self.rollout(data, list(key[1]))
        if self.iterations > 1 and data.split == "train":
            self.cache = {key: [rollouts, self.iterations - 1]}
        return rollouts

    def rollout(self, data: Any, indices: list[int]) -> Rollouts:
        from tunesmith.stages.rewards import score

        prompts = [data.prompt_ids(i) for i in indices for _ in range(self.group)]
        answers = self.sample(prompts)
        texts = [self.engine.cut_at_stop(self.tokenizer.decode(a, skip_special_tokens=True)).strip() for a in answers]
        meta = [data.meta[i] for i in indices for _ in range(self.group)]
        columns: dict[str, list] = {}
        for m in meta:
            for name in m["columns"]:
                columns.setdefault(name, [])
        for name in columns:
            columns[name] = [m["columns"].get(name) for m in meta]
        per_fn = score(self.funcs, [m["prompt"] for m in meta], texts, [m["reference"] for m in meta], columns)
        return self.assemble(data, indices, prompts, answers, texts, per_fn)

    def sample(self, prompts: list[list[int]]) -> list[list[int]]:
        import torch

        from tunesmith.train.head_loss import installed_head

        if self.vllm is not None:
            return self.vllm.generate_ids(prompts, self.rollout_count)

        head, was_training = installed_head(self.model), self.model.training
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        packed = base.config._attn_implementation  # training's packed-row attention knows no KV cache or padding
        self.model.eval()
        base.set_attn_implementation("sdpa")
        if head is not None:
            head.passing = False  # generation needs the logits
        try:
            with torch.no_grad(), self.acc.autocast():
                return self.engine.generate_ids(prompts, batch_size=len(prompts), keep_stop=True)
        finally:
            if head is not None:
                head.passing = True
            base.set_attn_implementation(packed)
            self.model.train(was_training)

    def assemble(self, data: Any, indices: list[int], prompts: list, answers: list, texts: list,
                 per_fn: dict[str, list[float]]) -> Rollouts:
        import numpy as np
        import torch

        from tunesmith.data.encode import IGNORE, shifted
        from tunesmith.data.pairs import PairBatch

        weights = {name: w for name, _, w in self.funcs}
        total = np.sum([np.array(v) * weights[name] for name, v in per_fn.items()], axis=0)
        groups = total.reshape(-1, self.group)
        std = groups.std(axis=1, ddof=1)
        advantages = ((groups - groups.mean(axis=1, keepdims=True)) / (std[:, None] + 1e-4)).reshape(-1)
        ids, targets, positions, bounds = [], [], [], [0]
        for prompt, answer in zip(prompts, answers):
            answer = answer or [self.engine.config.eos_token_id[0]]  # an empty answer still ends its turn
            seq = prompt + answer
            ids += seq
            targets += shifted(np.array([IGNORE] * len(prompt) + answer)).tolist()
            positions += list(range(len(seq)))
            bounds.append(len(ids))
        row = lambda v: torch.tensor(v, dtype=torch.long)[None]  # noqa: E731
        seqs = PairBatch(row(ids), row(positions), row(targets), bounds, indices, data.split)
        self.log_samples(data, indices, texts, total, per_fn)
        sums = {"reward": float(total.sum()), "reward_std": float(np.repeat(std, self.group).sum()),
                "answer_length": float(sum(max(len(a), 1) for a in answers)), "count/answers": float(len(answers)),
                **{f"rewards/{name}": float(sum(v)) for name, v in per_fn.items()}}
        device = next(self.model.parameters()).device
        out = Rollouts(seqs, torch.tensor(advantages, dtype=torch.float32), None, None, sums).to(device)
        old = self.fixed_logps(self.model, out.seqs) if self.iterations > 1 else None
        ref = self.fixed_logps(self.reference, out.seqs, self.lora_reference) if self.beta > 0 else None
        return replace(out, old_logps=old, ref_logps=ref)

    def fixed_logps(self, model: Any, seqs: Any, adapter_off: bool = False) -> Any:
        """Per-token log-probabilities that stay fixed through a batch's iterations: the sampling policy's, or the
        reference's (`adapter_off`: LoRA's reference is the same model with its adapter disabled)."""
        import contextlib

        import torch

        from tunesmith.train.objectives import token_logps

        off = model.disable_adapter() if adapter_off else contextlib.nullcontext()
        with torch.no_grad(), self.acc.autocast(), off:
            return token_logps(model, seqs)[0]

    def log_samples(self, data: Any, indices: list[int], texts: list[str], total: Any,
                    per_fn: dict[str, list[float]]) -> None:
        self.rollout_count += 1
        if self.completions_file is None or data.split != "train" or (self.rollout_count - 1) % self.log_every:
            return
        with self.completions_file.open("a", encoding="utf-8") as fh:
            for k in range(self.group):
                fh.write(json.dumps({"rollout": self.rollout_count, "prompt": data.meta[indices[0]]["prompt"],
                                     "answer": texts[k], "reward": float(total[k]),
                                     **{name: v[k] for name, v in per_fn.items()}}, ensure_ascii=False) + "\n")

    def loss_sum(self, model: Any, batch: Rollouts) -> tuple[Any, dict[str, Any]]:
        import torch

        from tunesmith.train.objectives import token_logps

        logp, seq_of = token_logps(model, batch.seqs)
        old = batch.old_logps if batch.old_logps is not None else logp.detach()
        ratio = torch.exp(logp - old)
        adv = batch.advantages[seq_of]
        clipped = torch.clamp(ratio, 1 - self.epsilon, 1 + self.epsilon)
        per_token = -torch.min(ratio * adv, clipped * adv)
        kl = torch.zeros_like(logp)
        if batch.ref_logps is not None:
            delta = batch.ref_logps - logp
            kl = torch.exp(delta) - delta - 1
            per_token = per_token + self.beta * kl
        loss = per_token.sum()
        was_clipped = ((ratio < 1 - self.epsilon) & (adv < 0)) | ((ratio > 1 + self.epsilon) & (adv > 0))
        dev = loss.device
        sums = {k: torch.tensor(v, device=dev) for k, v in batch.sums.items()}
        return loss, {"loss": loss.detach(), "clip_ratio": was_clipped.float().sum(), "kl": kl.detach().sum(), **sums}


def keeps_reference(cfg: Config) -> bool:
    return cfg.finetuning.pref_beta > 0 and cfg.finetuning.finetuning_type != "lora"


STAGE = Stage("grpo", rows="prompts", build=build, check=check, needs_packed_rows=True,
              keeps_reference=keeps_reference, shards=lambda cfg: not keeps_reference(cfg))
