"""Generation with vLLM (CUDA GPUs): the same generation settings and LoRA adapter, mapped onto vLLM's API."""

from __future__ import annotations

from typing import Any

from tunesmith.config import Config
from tunesmith.config.loader import ConfigError
from tunesmith.infer import Generation


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError:
        raise ConfigError(["`infer_backend: vllm` needs vLLM, which is not installed here (it needs a CUDA GPU): "
                           "pip install 'tunesmith[vllm]', or use `infer_backend: hf`"]) from None
    return vllm


def sampling_kwargs(cfg: Config, stops: list[str]) -> dict[str, Any]:
    """tunesmith's generation settings as vllm.SamplingParams arguments (greedy = temperature 0)."""
    g = cfg.generation
    if g.num_beams > 1:
        raise ConfigError(["`num_beams` > 1 is not supported with `infer_backend: vllm`; use `infer_backend: hf`"])
    kwargs: dict[str, Any] = {"max_tokens": g.max_new_tokens, "repetition_penalty": g.repetition_penalty,
                              "stop": [s for s in stops if s], "temperature": g.temperature if g.do_sample else 0.0}
    if g.do_sample:
        kwargs.update(top_p=g.top_p, top_k=g.top_k)
    return kwargs


class VLLMEngine:
    def __init__(self, cfg: Config, stops: list[str]):
        vllm = import_vllm()
        adapters = [p.strip() for p in (cfg.model.adapter_name_or_path or "").split(",") if p.strip()]
        if len(adapters) > 1:
            raise ConfigError(["vLLM applies one LoRA adapter at a time; merge the others first with "
                               "`tunesmith export`"])
        dtype = "auto" if cfg.model.infer_dtype == "auto" else cfg.model.infer_dtype
        self.llm = vllm.LLM(model=cfg.model.model_name_or_path, dtype=dtype, enable_lora=bool(adapters),
                            trust_remote_code=cfg.model.trust_remote_code, max_model_len=cfg.data.cutoff_len +
                            cfg.generation.max_new_tokens, seed=cfg.training.seed)
        self.lora = None
        if adapters:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("adapter", 1, adapters[0])
        self.params = vllm.SamplingParams(**sampling_kwargs(cfg, stops))

    def generate(self, prompts: list[str], batch_size: int) -> list[Generation]:
        # token ids, not text: the rendered prompt already holds any BOS the template wants
        tokenizer = self.llm.get_tokenizer()
        requests = [{"prompt_token_ids": tokenizer.encode(p, add_special_tokens=False)} for p in prompts]
        outputs = self.llm.generate(requests, self.params, lora_request=self.lora)
        return [Generation(o.outputs[0].text.strip(), len(o.outputs[0].token_ids)) for o in outputs]
