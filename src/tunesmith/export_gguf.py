"""GGUF export (`export_format: gguf`) for llama.cpp, Ollama and LM Studio: llama.cpp's own converter on the
merged model, an Ollama Modelfile beside it, and `--verify` by llama.cpp itself.

The merged model is first written as a Hugging Face folder inside the temporary export folder; llama.cpp's
`convert_hf_to_gguf.py` (with its `conversion/` package and `gguf-py`) turns it into one .gguf file holding the
weights, the tokenizer (vocabulary, merges, special tokens, pre-tokenizer type) and the chat template. That
converter comes from the source distribution of llama-cpp-python (`LLAMA_CPP_PYTHON`, fetched once with pip into
~/.cache/tunesmith/llama.cpp/), or from a llama.cpp checkout named by `llama_cpp_source`. It runs in a
subprocess of this module (`python -m tunesmith.export_gguf`), which adds one thing: a tokenizer whose
pre-tokenizer llama.cpp identifies only by the hash of known models' token ids (a custom vocabulary over a
standard pre-tokenizer, such as the shipped tiny model's GPT-2 byte-level one) gets that standard type, read from
tokenizer.json. `--verify` then checks that llama.cpp tokenizes like the tokenizer and continues greedily like
the merged model.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from tunesmith.errors import StopError

log = logging.getLogger("tunesmith.export")

LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python release whose llama.cpp converter is fetched
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # the converter's own output types (k-quants need llama-quantize)
_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py")
# Split regexes of standard pre-tokenizers -> llama.cpp's name for them
_SPLIT_PRE = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}


def converter_source(configured: str | None) -> Path:
    """A folder holding llama.cpp's convert_hf_to_gguf.py, conversion/ and gguf-py/."""
    if configured:
        folder = Path(configured).expanduser()
        missing = [p for p in _PARTS if not (folder / p).exists()]
        if missing:
            raise StopError(f"`llama_cpp_source` {folder} lacks {', '.join(missing)}: point it at a llama.cpp "
                            "checkout (its top folder)", exit_code=2)
        return folder
    cache = Path(os.path.expanduser("~/.cache/tunesmith/llama.cpp")) / LLAMA_CPP_PYTHON
    if all((cache / p).exists() for p in _PARTS):
        return cache
    return _fetch(cache)


def _fetch(cache: Path) -> Path:
    log.info("fetching llama.cpp's converter: the llama-cpp-python %s source distribution (about 75 MB, once)",
             LLAMA_CPP_PYTHON)
    with tempfile.TemporaryDirectory(prefix="tunesmith-llama-cpp-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp,
               f"llama-cpp-python=={LLAMA_CPP_PYTHON}"]
        run = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if run.returncode or not archives:
            raise StopError(f"could not fetch llama.cpp's converter with `{' '.join(cmd)}`:\n{run.stderr[-1500:]}\n"
                            "  fix: make PyPI reachable, or set `llama_cpp_source` to a llama.cpp checkout",
                            exit_code=1)
        staging = cache.with_name(cache.name + f".tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        prefix = f"{archives[0].name[: -len('.tar.gz')]}/vendor/llama.cpp/"
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                name = member.name
                if name.startswith(prefix) and name[len(prefix):].split("/")[0] in _PARTS and \
                        (member.isfile() or member.isdir()):
                    member.name = name[len(prefix):]
                    tar.extract(member, staging, filter="data")
        cache.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(staging, cache)
    return cache


def convert(hf_dir: Path, outfile: Path, gguf_type: str, source: Path) -> None:
    """llama.cpp's converter on a Hugging Face folder, in a subprocess; its failure becomes a StopError."""
    cmd = [sys.executable, "-m", "tunesmith.export_gguf", str(source), str(hf_dir), str(outfile), gguf_type]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode or not outfile.is_file():
        tail = "\n".join((run.stderr or run.stdout).strip().splitlines()[-6:])
        raise StopError(f"llama.cpp's converter could not convert this model to GGUF:\n{tail}\n  the architectures "
                        "and tokenizers it converts are llama.cpp's (Llama, Mistral, Qwen2/Qwen3, Gemma and many "
                        "more); export with `export_format: safetensors` otherwise", exit_code=1)


def modelfile(gguf_name: str, stops: list[str]) -> str:
    lines = ["# Ollama: `ollama create <name> -f Modelfile` in this folder, then `ollama run <name>`.",
             "# The chat template the model was trained with is in the GGUF metadata (tokenizer.chat_template);",
             "# Ollama applies it for the template families it knows; otherwise add a TEMPLATE in Ollama's syntax.",
             f"FROM ./{gguf_name}"]
    lines += [f"PARAMETER stop {json.dumps(s)}" for s in stops if s]
    return "\n".join(lines) + "\n"


def write_gguf(tmp: Path, hf_dir: Path, name: str, gguf_type: str, source: str | None, stops: list[str]) -> Path:
    gguf_path = tmp / f"{name}.{gguf_type}.gguf"
    convert(hf_dir, gguf_path, gguf_type, converter_source(source))
    (tmp / "Modelfile").write_text(modelfile(gguf_path.name, stops), encoding="utf-8")
    return gguf_path


VERIFY_PROMPTS = ["What is the capital of France?", "12 plus 30 equals", "The word apple spelled backwards is",
                  "Sort these numbers: 5, 3, 9", "法国的首都是哪里？"]


def verify(hf_dir: Path, gguf_path: Path, tokens: int = 32) -> dict[str, Any]:
    """llama.cpp against the merged Hugging Face model on VERIFY_PROMPTS: the same prompt tokens, how many greedy
    continuations are identical over `tokens` tokens, and the largest difference of the next-token
    log-probabilities."""
    try:
        from llama_cpp import Llama
    except ImportError:
        raise StopError("`--verify` of a GGUF export loads it with llama.cpp: pip install 'tunesmith[gguf]' "
                        "(builds llama-cpp-python; a few minutes)", exit_code=2) from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    # the KV cache in f32 (llama.cpp keeps it in f16 by default): the comparison is of the weights alone
    llm = Llama(model_path=str(gguf_path), n_ctx=256, logits_all=True, verbose=False, seed=0, type_k=0, type_v=0,
                flash_attn=False)
    same_tokens, same_greedy, worst = 0, 0, 0.0
    for prompt in VERIFY_PROMPTS:
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        same_tokens += ids == llm.tokenize(prompt.encode(), add_bos=False, special=True)
        with torch.no_grad():  # greedy by hand on both sides: no stop tokens, no generation settings
            ref_logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
            expected = list(ids)
            for _ in range(tokens):
                expected.append(int(model(torch.tensor([expected])).logits[0, -1].argmax()))
        llm.reset()
        llm.eval(ids)
        logits = torch.tensor(llm.scores[llm.n_tokens - 1])
        worst = max(worst, float((torch.log_softmax(logits, -1) - ref_logp).abs().max()))
        generated = []
        for _ in range(tokens):  # greedy in llama.cpp, no stop tokens, as the reference
            nxt = int(torch.tensor(llm.scores[llm.n_tokens - 1]).argmax())
            generated.append(nxt)
            llm.eval([nxt])
        same_greedy += generated == expected[len(ids):]
    return {"prompts": len(VERIFY_PROMPTS), "same_prompt_tokens": same_tokens, "same_greedy": same_greedy,
            "max_logprob_diff": worst}


def _standard_pre_tokenizer(dir_model: Path) -> str | None:
    """llama.cpp's name for the pre-tokenizer tokenizer.json declares, where it is a standard one."""
    try:
        pre = json.loads((dir_model / "tokenizer.json").read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    except (OSError, ValueError):
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    splits = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    return _SPLIT_PRE.get(splits[0]) if len(splits) == 1 else None


def _run_converter(source: Path, hf_dir: str, outfile: str, gguf_type: str) -> None:
    sys.path[:0] = [str(source), str(source / "gguf-py")]
    from conversion import base  # type: ignore[import-not-found]

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            standard = _standard_pre_tokenizer(Path(self.dir_model))
            if standard is None:
                raise
            print(f"tunesmith: pre-tokenizer not known to llama.cpp by hash; tokenizer.json declares {standard}",
                  file=sys.stderr)
            return standard

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    import convert_hf_to_gguf  # type: ignore[import-not-found]

    sys.argv = ["convert_hf_to_gguf.py", hf_dir, "--outfile", outfile, "--outtype", gguf_type]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    _run_converter(Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
