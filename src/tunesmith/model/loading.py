"""Load a causal LM for training or inference, and the template saved with a trained model."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tunesmith.config import Config
from tunesmith.config.loader import ConfigError

log = logging.getLogger("tunesmith.model")
TEMPLATE_FILE = "tunesmith_template.json"


def _attn(cfg: Config) -> str:
    if cfg.model.attn_implementation != "auto":
        return cfg.model.attn_implementation
    return "sdpa"


def quantization(cfg: Config, compute_dtype: Any) -> dict[str, Any]:
    """from_pretrained arguments that load the base quantized by bitsandbytes (`quantization_bit`), placed on this
    process's device (quantized weights cannot be moved after loading)."""
    bits = cfg.model.quantization_bit
    if bits is None:
        return {}
    import torch
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError([f"`quantization_bit: {bits}` needs bitsandbytes: pip install 'tunesmith[qlora]'"]) from None
    if compute_dtype in (None, "auto"):
        compute_dtype = torch.float32
    settings = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.model.quantization_type,
                                  bnb_4bit_use_double_quant=cfg.model.double_quantization,
                                  bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=torch.uint8) \
        if bits == 4 else BitsAndBytesConfig(load_in_8bit=True)
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    log.info("loading the base model quantized to %d bits (%s)", bits, cfg.model.quantization_type if bits == 4
             else "int8")
    return {"quantization_config": settings, "device_map": {"": device}}


def keep_4bit_layout_on_cpu(model: Any) -> None:
    """bitsandbytes repacks 4-bit weights for its AVX-512 bf16 CPU kernel the first time a layer runs without
    gradients, and that repacking assumes the input width is a multiple of the quantization block; layers where
    it is not keep the standard layout (the same results, without the faster kernel)."""
    for module in model.modules():
        quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
        blocksize = getattr(quant_state, "blocksize", None)
        if getattr(module, "support_avx512bf16_for_cpu", False) and blocksize and module.in_features % blocksize:
            module.support_avx512bf16_for_cpu = False


def is_quantized(model: Any) -> bool:
    return bool(getattr(model, "is_quantized", False) or getattr(model.config, "quantization_config", None))


def with_attention(cfg: Config, load: Any) -> Any:
    """`load(attention)` with the configured attention; under `auto`, a model without an SDPA path in
    transformers (Gemma 2) gets its eager attention."""
    try:
        return load(_attn(cfg))
    except ValueError as err:
        if cfg.model.attn_implementation != "auto" or "scaled_dot_product_attention" not in str(err):
            raise
        log.info("this model has no SDPA attention in transformers; loading it with eager attention")
        return load("eager")


def load_model(cfg: Config, dtype: Any, for_training: bool, compute_dtype: Any = None) -> Any:
    from transformers import AutoModelForCausalLM

    path = cfg.model.model_name_or_path
    quantized = quantization(cfg, compute_dtype if compute_dtype is not None else dtype)
    def load(attn: str) -> Any:
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.model_revision,
            cache_dir=cfg.model.cache_dir, attn_implementation=attn, **quantized)

    try:
        model = with_attention(cfg, load)
    except (OSError, ValueError) as err:
        raise ConfigError([f"`model_name_or_path`: could not load a model from `{path}`: "
                           f"{str(err).splitlines()[0]}; point it at a model folder (config.json and weights)"]) from None
    if not quantized and is_quantized(model):
        raise ConfigError([f"`model_name_or_path`: `{path}` is a quantized model; tunesmith does not train or merge "
                           "quantized weights yet: use the unquantized base model"])
    if quantized:
        keep_4bit_layout_on_cpu(model)
    if for_training:
        model.config.use_cache = False
    else:  # frozen: no autograd graph is built through it (and no global switch is flipped)
        model.eval().requires_grad_(False)
    return model


def save_template_info(out_dir: Path, template: Any) -> None:
    if template is None:
        return
    info = {"name": template.name, "stop": template.stop, "default_system": template.default_system,
            "enable_thinking": template.enable_thinking, "template_kwargs": template.template_kwargs}
    (out_dir / TEMPLATE_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")


def saved_template_name(folder: str | None) -> dict[str, Any] | None:
    """The template a tunesmith-trained adapter or model was trained with, if recorded."""
    if folder and (Path(folder) / TEMPLATE_FILE).is_file():
        return json.loads((Path(folder) / TEMPLATE_FILE).read_text())
    return None


def apply_adapters(model: Any, paths: list[str], merge_last: bool = True) -> Any:
    """LoRA adapters applied in order, each merged into the weights in place (so they are held once); with
    `merge_last=False` the last one stays a peft adapter (the unmerged reference `export --verify` uses)."""
    if not paths:
        return model
    from peft import PeftModel

    for i, path in enumerate(paths):
        model = PeftModel.from_pretrained(model, path)
        if merge_last or i < len(paths) - 1:
            model = model.merge_and_unload()
    return model


def inference_dtype(cfg: Config) -> Any:
    """`infer_dtype`, except that a CPU without native bf16 computes in fp32 what would be half precision
    (the model's own dtype under `auto` quietly, an explicit choice with a warning), unless `allow_slow_bf16`."""
    import torch

    from tunesmith.runtime import allow_slow_bf16_ok, use_bf16_on_cpu
    from tunesmith.config.validate import model_config

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    wanted = cfg.model.infer_dtype
    if torch.cuda.is_available() or cfg.model.allow_slow_bf16:
        return "auto" if wanted == "auto" else dtypes[wanted]
    if wanted == "auto":
        stored = model_config(cfg).get("dtype") or model_config(cfg).get("torch_dtype")
        if stored in ("bfloat16", "float16") and not allow_slow_bf16_ok(False):
            log.info("the model is stored in %s; computing in float32 on this CPU (no native bf16)", stored)
            return torch.float32
        return "auto"
    half = wanted in ("bfloat16", "float16")
    if half and not use_bf16_on_cpu(True, False, f"infer_dtype: {wanted}"):
        return torch.float32
    return dtypes[wanted]


def load_for_inference(cfg: Config) -> Any:
    """Base model with the configured adapters merged in (in order), in `infer_dtype`, in eval mode. A quantized
    base (`quantization_bit`) keeps its adapter unmerged: merging into 4-bit weights would round it away."""
    import torch

    model = load_model(cfg, inference_dtype(cfg), for_training=False)
    quantized = cfg.model.quantization_bit is not None
    if quantized and len(cfg.adapter_paths()) > 1:
        raise ConfigError(["a quantized base takes one adapter: merge the others first with `tunesmith export`"])
    model = apply_adapters(model, cfg.adapter_paths(), merge_last=not quantized)
    if torch.cuda.is_available() and not quantized:
        model = model.to("cuda")
    return model.eval()
