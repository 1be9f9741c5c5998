"""Head + loss for a large vocabulary: peak memory and time of one training step, chunked against plain.

A Llama-shaped model with hidden 256, 2 layers and Qwen's 151,936-token vocabulary, fp32, every weight trained;
one pass of 8,192 supervised tokens (one row). Each mode runs in a fresh process: 1 warm-up step, then 3 timed
steps (forward, backward, SGD update); peak RSS is the process's, measured before the model is built (base) and
at the end. One JSON line per mode.

    python benchmarks/large_vocab.py [--tokens 8192] [--vocab 151936]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def one_mode(mode: str, tokens: int, vocab: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunesmith.data.batching import Batch
    from tunesmith.train import head_loss
    from tunesmith.train.loss import token_loss_sum

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=tokens,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).train()
    if mode == "chunked":
        head_loss.install(model, lambda m: True)
    ids = torch.randint(0, vocab, (1, tokens))
    batch = Batch(input_ids=ids, position_ids=torch.arange(tokens)[None], targets=torch.roll(ids, -1, 1),
                  attention_mask=None, n_samples=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    times, losses = [], []
    for step in range(4):
        started = time.perf_counter()
        loss, _ = token_loss_sum(model, batch)
        (loss / tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - started)
        losses.append(round(float(loss) / tokens, 6))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "tokens": tokens, "vocab": vocab, "step_seconds": round(min(times), 3),
            "peak_rss_mb": round(peak), "rss_above_imports_mb": round(peak - base_rss), "losses": losses}


def main() -> None:
    from tunesmith.runtime import describe_cpu

    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(one_mode(args.mode, args.tokens, args.vocab)))
        return
    for mode in ("chunked", "plain"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--tokens", str(args.tokens), "--vocab",
                              str(args.vocab)], capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(describe_cpu({**result, "date": time.strftime("%Y-%m-%d")})), flush=True)


if __name__ == "__main__":
    main()
