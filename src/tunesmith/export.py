"""`tunesmith export`: merge LoRA adapters into the base model and write a standard Hugging Face model folder.

The merge happens in place (peft's merge_and_unload), so the weights are held once; the folder is written beside
`export_dir` under a temporary name and renamed when complete, so a killed export never looks finished.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from tunesmith import __version__
from tunesmith.config import Config
from tunesmith.config.loader import ConfigError
from tunesmith.config.validate import check_finetuning, check_model, raise_if
from tunesmith.model.tokenizer import load_inference_tokenizer

log = logging.getLogger("tunesmith.export")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def validate_for_export(cfg: Config, force: bool) -> Path:
    problems = check_model(cfg) + check_finetuning(cfg)
    if not cfg.export.export_dir:
        problems.append("`export_dir` is required: the folder the merged model is written to")
    if cfg.export.export_format == "gguf" and cfg.export.export_legacy_format:
        problems.append("`export_legacy_format` writes .bin files; it does not apply to `export_format: gguf`")
    if cfg.export.export_size <= 0:
        problems.append(f"`export_size` must be positive (GB), got {cfg.export.export_size}")
    raise_if(problems)
    out = Path(cfg.export.export_dir)  # type: ignore[arg-type]
    if out.exists() and any(out.iterdir()) and not (cfg.training.overwrite_output_dir or force):
        raise ConfigError([f"export_dir `{out}` is not empty; set `overwrite_output_dir: true` or pass --force"])
    return out


def load_merged(cfg: Config, dtype: Any, merge_last: bool = True) -> Any:
    """Base model with every adapter merged in, in order (the last left unmerged for `--verify`)."""
    import copy

    from tunesmith.model.loading import apply_adapters, load_model

    if cfg.model.quantization_bit is not None:
        cfg = copy.deepcopy(cfg)
        cfg.model.quantization_bit = None
        log.info("quantization_bit: the adapters are merged into the full-precision base (they were trained on "
                 "a quantized copy of it); the export is not quantized")
    return apply_adapters(load_model(cfg, dtype, for_training=False), cfg.adapter_paths(), merge_last)


def stop_token_ids(tokenizer: Any, template: Any) -> list[int]:
    ids = []
    for text in (template.stop if template else []) + [tokenizer.eos_token]:
        if text:
            tok = tokenizer.convert_tokens_to_ids(text)
            if tok is not None and tok != tokenizer.unk_token_id and tok not in ids:
                ids.append(tok)
    return ids


def model_card(cfg: Config, dtype: Any) -> str:
    adapters = cfg.adapter_paths()
    training = ""
    for path in adapters[-1:]:
        config_file = Path(path) / "tunesmith_config.yaml"
        if config_file.is_file():
            training = f"\n## Training config\n\n```yaml\n{config_file.read_text()}```\n"
    lines = [f"# {Path(cfg.export.export_dir).name}", "",  # type: ignore[arg-type]
             f"- base model: `{cfg.model.model_name_or_path}`",
             f"- adapters merged (in order): {', '.join(f'`{a}`' for a in adapters) or 'none'}",
             f"- dtype: {str(dtype).replace('torch.', '')}", f"- template: `{cfg.model.template}`",
             f"- exported by tunesmith {__version__}", ""]
    return "\n".join(lines) + training


def write_folder(model: Any, tokenizer: Any, template: Any, cfg: Config, dtype: Any, tmp: Path) -> None:
    e = cfg.export
    tmp.mkdir(parents=True)
    stops = stop_token_ids(tokenizer, template)
    if stops:
        model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if e.export_legacy_format:
        log.warning("export_legacy_format: writing pickle .bin files; loading pickles from strangers can run "
                    "arbitrary code, prefer safetensors")
    max_bytes = int(e.export_size * 1e9)
    if e.export_legacy_format:
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        save_legacy_shards(model, tmp, max_bytes)
    else:
        model.save_pretrained(tmp, max_shard_size=max_bytes)
    tokenizer.save_pretrained(tmp)
    if template is not None:
        from tunesmith.model.loading import save_template_info

        save_template_info(tmp, template)
    (tmp / "README.md").write_text(model_card(cfg, dtype), encoding="utf-8")
    from tunesmith.model.value_head import HEAD_FILE

    for folder in cfg.adapter_paths()[-1:] or [cfg.model.model_name_or_path]:
        if (Path(folder) / HEAD_FILE).is_file():  # a reward model's value head travels with it
            shutil.copy2(Path(folder) / HEAD_FILE, tmp / HEAD_FILE)


def save_legacy_shards(model: Any, out: Path, max_bytes: int) -> None:
    """pytorch_model*.bin shards plus their index (transformers 5 no longer writes them itself)."""
    import json

    from huggingface_hub import split_torch_state_dict_into_shards

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    split = split_torch_state_dict_into_shards(state, filename_pattern="pytorch_model{suffix}.bin",
                                               max_shard_size=max_bytes)
    for filename, names in split.filename_to_tensors.items():
        torch.save({name: state[name] for name in names}, out / filename)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2) + "\n")


def replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an old folder is removed only after the new one is there."""
    old = out.with_name(out.name + f".old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def match_umask(folder: Path) -> None:
    """Give every written file the mode a plain `open` would (some writers create theirs 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


# Largest logit difference, relative to the largest reference logit, that `--verify` accepts: merging adds
# rounding of the exported dtype only.
VERIFY_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@torch.no_grad()
def verify(cfg: Config, exported: Path, tokenizer: Any, dtype: Any) -> tuple[float, float]:
    """Largest logit difference between the exported model and base + adapters on a few prompts, absolute and
    relative to the largest reference logit."""
    from transformers import AutoModelForCausalLM

    reference = load_merged(cfg, dtype, merge_last=False).eval()
    result = AutoModelForCausalLM.from_pretrained(exported, dtype=dtype).eval()
    prompts = ["What is the capital of France?", "12 plus 30 equals", "法国的首都是哪里？"]
    worst, scale = 0.0, 0.0
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        a, b = reference(input_ids=ids).logits.float(), result(input_ids=ids).logits.float()
        worst, scale = max(worst, float((a - b).abs().max())), max(scale, float(a.abs().max()))
    return worst, worst / max(scale, 1e-12)


def run_gguf(cfg: Config, model: Any, tokenizer: Any, template: Any, dtype: Any, tmp: Path, out: Path,
             check: bool) -> int:
    """The merged model as a Hugging Face folder inside `tmp`, converted to one .gguf with a Modelfile; the
    folder is checked against the file (`--verify`) and removed before `tmp` becomes `out`."""
    from tunesmith import export_gguf

    e = cfg.export
    hf = tmp / "hf"
    write_folder(model, tokenizer, template, cfg, dtype, hf)
    del model
    for name in ("tokenizer.model",):  # llama.cpp reads SentencePiece vocabularies (Gemma, Llama 2) from it
        source = next((Path(p) / name for p in [*cfg.adapter_paths()[::-1], cfg.model.model_name_or_path]
                       if (Path(p) / name).is_file()), None)
        if source is not None and not (hf / name).exists():
            shutil.copy2(source, hf / name)
    stops = template.stop if template is not None else []
    gguf_path = export_gguf.write_gguf(tmp, hf, out.name, e.gguf_type, e.llama_cpp_source, stops)
    result = export_gguf.verify(hf, gguf_path) if check else None
    shutil.rmtree(hf)
    match_umask(tmp)
    replace_folder(tmp, out)
    size = (out / gguf_path.name).stat().st_size / 2**20
    print(f"exported {out / gguf_path.name} ({e.gguf_type}, {size:.1f} MB) and an Ollama Modelfile")
    if result is None:
        return 0
    n = result["prompts"]
    exact = e.gguf_type in ("f32", "f16")  # their rounding alone must not flip a greedy token
    ok = result["same_prompt_tokens"] == n and (result["same_greedy"] == n or not exact)
    print(f"verify {'OK' if ok else 'FAILED'}: llama.cpp tokenizes {result['same_prompt_tokens']}/{n} prompts as "
          f"the tokenizer does; greedy 32-token continuations identical for {result['same_greedy']}/{n}"
          f"{'' if exact else ' (not required for ' + e.gguf_type + ')'}; next-token log-probabilities differ by at "
          f"most {result['max_logprob_diff']:.3e}")
    return 0 if ok else 1


def run(cfg: Config, extras: dict[str, Any]) -> int:
    out = validate_for_export(cfg, bool(extras.get("force")))
    e = cfg.export
    dtype = "auto" if e.export_dtype == "auto" else DTYPES[e.export_dtype]
    model = load_merged(cfg, dtype)
    if e.export_dtype != "auto":
        model = model.to(DTYPES[e.export_dtype])
    final_dtype = next(model.parameters()).dtype
    tokenizer, template = load_inference_tokenizer(cfg, fallback=None)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if e.export_format == "gguf":
        return run_gguf(cfg, model, tokenizer, template, final_dtype, tmp, out, bool(extras.get("verify")))
    write_folder(model, tokenizer, template, cfg, final_dtype, tmp)
    match_umask(tmp)
    del model
    replace_folder(tmp, out)
    files = sorted(p.name for p in out.iterdir() if p.suffix in (".safetensors", ".bin"))
    print(f"exported {len(files)} weight file(s) in {str(final_dtype).replace('torch.', '')} to {out}")
    if extras.get("verify"):
        diff, relative = verify(cfg, out, tokenizer, final_dtype)
        tolerance = VERIFY_TOLERANCE.get(final_dtype, 3e-2)
        verdict = "OK" if relative <= tolerance else "FAILED"
        print(f"verify {verdict}: the exported model's logits differ from base + adapters by at most {diff:.3e} "
              f"({relative:.2e} of the largest logit; tolerance {tolerance:g} for {str(final_dtype)[6:]})")
        return 0 if verdict == "OK" else 1
    return 0
