"""grpo's sampling on vLLM (`infer_backend: vllm`, CUDA GPUs): each training process keeps a vLLM engine of the
base model on its own GPU, beside the model being trained, and before every rollout hands it the policy as it is
now: the LoRA adapter is saved to a folder of this process and passed as a new LoRARequest, whose fresh id makes
vLLM load it (a few MB; the base weights never move).

Only LoRA is handed over this way (full and freeze tuning sample with the hf engine). vLLM takes the GPU memory
`vllm_gpu_util` gives it, so it must leave the training its share. Each answer is sampled with its own seed (from
`seed`, the process, the rollout's number and the answer's place): runs repeat, but a resumed run samples other
answers than the straight run would have (the hf engine's rollouts resume exactly: their RNG state is saved).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tunesmith.config import Config
from tunesmith.infer.vllm import engine_kwargs, import_vllm, sampling_kwargs

# vLLM sharing one GPU with training: more than this share leaves too little for the training step
MAX_SHARED_GPU_UTIL = 0.7


def problems(cfg: Config) -> list[str]:
    """What grpo with vLLM rollouts needs from the config (no vLLM import)."""
    found = []
    if cfg.finetuning.finetuning_type != "lora":
        found.append("`infer_backend: vllm` with `stage: grpo` hands the policy's LoRA adapter to vLLM each step, "
                     "so it needs `finetuning_type: lora`; full and freeze tuning sample with `infer_backend: hf`")
    if cfg.model.vllm_gpu_util > MAX_SHARED_GPU_UTIL:
        found.append(f"`vllm_gpu_util` is {cfg.model.vllm_gpu_util}: with `stage: grpo` vLLM shares the GPU with "
                     f"training, so give it at most {MAX_SHARED_GPU_UTIL} (e.g. `vllm_gpu_util: 0.3`; more for "
                     "long answers, less for large models)")
    if cfg.model.quantization_bit is not None:
        found.append("`infer_backend: vllm` with `stage: grpo` does not sample from a bitsandbytes-quantized base; "
                     "use `infer_backend: hf` with `quantization_bit`")
    return found


class VLLMRollouts:
    """generate_ids(prompt ids) -> answer ids (the stop token kept), sampled by vLLM with the current adapter."""

    def __init__(self, cfg: Config, model: Any, stop_token_ids: list[int]):
        vllm = import_vllm()
        self.model = model
        kwargs = engine_kwargs(cfg, [])
        rank = cfg.finetuning.lora_rank  # vLLM takes powers of two from 8 up
        kwargs.update(enable_lora=True, max_loras=1, tensor_parallel_size=1,
                      max_lora_rank=cfg.model.vllm_max_lora_rank or max(16, 1 << (rank - 1).bit_length()))
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # inside torchrun: one engine per process, no group of its own
            kwargs["distributed_executor_backend"] = "external_launcher"
        self.llm = vllm.LLM(**kwargs)
        self.sampling = vllm.SamplingParams
        g = cfg.generation
        self.settings = {**sampling_kwargs(g, []), "stop": None, "stop_token_ids": stop_token_ids,
                         "skip_special_tokens": False, "temperature": g.temperature, "top_p": g.top_p,
                         "top_k": g.top_k}
        self.seed, self.version = cfg.training.seed, 0
        self.folder = Path(tempfile.mkdtemp(prefix="tunesmith-policy-"))
        atexit.register(shutil.rmtree, self.folder, True)

    def hand_over(self) -> Any:
        """The policy's adapter as it is now, saved and named for vLLM (a new id: vLLM caches by id)."""
        from vllm.lora.request import LoRARequest

        self.version += 1
        previous = self.folder / f"v{self.version - 1}"
        shutil.rmtree(previous, ignore_errors=True)
        current = self.folder / f"v{self.version}"
        self.model.save_pretrained(current, safe_serialization=True)
        return LoRARequest(f"policy-{self.version}", self.version, str(current))

    def generate_ids(self, prompts: list[list[int]], rollout: int) -> list[list[int]]:
        adapter = self.hand_over()
        rank = int(os.environ.get("RANK", "0"))
        base = (self.seed * 1_000_003 + rank * 7_919 + rollout * 10_007) % 2**31
        params = [self.sampling(**self.settings, seed=(base + k) % 2**31) for k in range(len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=adapter,
                                    use_tqdm=False)
        return [with_stop_token(o.outputs[0]) for o in outputs]


def with_stop_token(output: Any) -> list[int]:
    """An answer's token ids ending with the stop token it stopped at (training learns to stop)."""
    ids = list(output.token_ids)
    stop = getattr(output, "stop_reason", None)
    if output.finish_reason == "stop" and isinstance(stop, int) and (not ids or ids[-1] != stop):
        ids.append(stop)
    return ids
