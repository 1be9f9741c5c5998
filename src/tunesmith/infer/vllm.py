"""Generation with vLLM (CUDA GPUs): the same generation settings and LoRA adapter, mapped onto vLLM's API."""

from __future__ import annotations

from typing import Any

from tunesmith.config import Config
from tunesmith.config.fields import GenerationArgs
from tunesmith.config.loader import ConfigError
from tunesmith.infer import Generation
from tunesmith.infer.answer import ChatEngineBase, Stream


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise ConfigError(["`infer_backend: vllm` needs vLLM, which is not installed here (it needs a CUDA GPU): "
                           "pip install 'tunesmith[vllm]', or use `infer_backend: hf`"]) from None
    return vllm


def sampling_kwargs(g: GenerationArgs, stops: list[str]) -> dict[str, Any]:
    """tunesmith's generation settings as vllm.SamplingParams arguments (greedy = temperature 0)."""
    if g.num_beams > 1:
        raise ConfigError(["`num_beams` > 1 is not supported with `infer_backend: vllm`; use `infer_backend: hf`"])
    kwargs: dict[str, Any] = {"max_tokens": g.max_new_tokens, "repetition_penalty": g.repetition_penalty,
                              "stop": [s for s in stops if s], "temperature": g.temperature if g.do_sample else 0.0}
    if g.do_sample:
        kwargs.update(top_p=g.top_p, top_k=g.top_k)
    return kwargs


def adapter_rank(folder: str) -> int:
    """The LoRA rank written in an adapter's adapter_config.json (peft's `r`)."""
    import json
    from pathlib import Path

    return int(json.loads((Path(folder) / "adapter_config.json").read_text())["r"])


def engine_kwargs(cfg: Config, adapters: list[str]) -> dict[str, Any]:
    """vllm.LLM arguments: LLaMA-Factory's vllm_* settings, the adapter's rank, every visible GPU for tensor
    parallelism unless `vllm_config` says otherwise."""
    import torch

    m = cfg.model
    kwargs: dict[str, Any] = {
        "model": m.model_name_or_path, "dtype": "auto" if m.infer_dtype == "auto" else m.infer_dtype,
        "trust_remote_code": m.trust_remote_code, "max_model_len": m.vllm_maxlen, "seed": cfg.training.seed,
        "gpu_memory_utilization": m.vllm_gpu_util, "enforce_eager": m.vllm_enforce_eager,
        "tensor_parallel_size": max(1, torch.cuda.device_count()), "enable_lora": bool(adapters)}
    if adapters:
        rank = adapter_rank(adapters[0])  # vLLM takes powers of two from 8 up
        kwargs["max_lora_rank"] = m.vllm_max_lora_rank or max(16, 1 << (rank - 1).bit_length())
    return {**kwargs, **m.vllm_config}


class VLLMEngine:
    def __init__(self, cfg: Config, stops: list[str]):
        vllm = import_vllm()
        adapters = cfg.adapter_paths()
        if len(adapters) > 1:
            raise ConfigError(["vLLM applies one LoRA adapter at a time; merge the others first with "
                               "`tunesmith export`"])
        self.llm = vllm.LLM(**engine_kwargs(cfg, adapters))
        self.lora = None
        if adapters:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("adapter", 1, adapters[0])
        self.params = vllm.SamplingParams(**sampling_kwargs(cfg.generation, stops))

    def generate(self, prompts: list[str], batch_size: int, progress: bool = False) -> list[Generation]:
        # token ids, not text: the rendered prompt already holds any BOS the template wants
        tokenizer = self.llm.get_tokenizer()
        requests = [{"prompt_token_ids": tokenizer.encode(p, add_special_tokens=False)} for p in prompts]
        outputs = self.llm.generate(requests, self.params, lora_request=self.lora, use_tqdm=progress)
        return [Generation(o.outputs[0].text.strip(), len(o.outputs[0].token_ids)) for o in outputs]


class VLLMChatEngine(ChatEngineBase):
    """The ChatEngine interface (chat and serve) on vLLM's offline engine. vLLM's `LLM` returns whole answers,
    so `stream` yields the answer in one piece."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.engine = VLLMEngine(cfg, self.template.stop)
        self.max_length = cfg.model.vllm_maxlen

    def _generate(self, prompt: list[int], gen: Any, extra_stops: list[str] | None, seed: int | None) -> Any:
        vllm = import_vllm()
        kwargs = sampling_kwargs(gen, self.template.stop + list(extra_stops or []))
        params = vllm.SamplingParams(**kwargs, seed=seed)
        out = self.engine.llm.generate([{"prompt_token_ids": prompt}], params, lora_request=self.engine.lora)
        return out[0].outputs[0]

    def stream(self, prompt: list[int], gen: Any, extra_stops: list[str] | None = None, stop_event: Any = None,
               seed: int | None = None) -> Any:
        output = self._generate(prompt, gen, extra_stops, seed)
        stream = Stream(iter([output.text] if output.text else []))
        stream.completion_tokens = len(output.token_ids)
        stream.finish_reason = "length" if output.finish_reason == "length" else "stop"
        return stream
