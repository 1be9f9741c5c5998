"""5-shot evaluation on the demo task with and without prefix KV reuse; prints one JSON line.

    python benchmarks/eval_prefix_reuse.py [--model models/tiny-llama] [--batch_size 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def random_model(hidden: int) -> str:
    import tempfile

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tempfile.mkdtemp(prefix="tunesmith-bench-")
    tok = AutoTokenizer.from_pretrained(ROOT / "models" / "tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=8,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def main() -> None:
    import torch

    from tunesmith.config import load_config
    from tunesmith.evaluate.run import evaluate_subjects
    from tunesmith.evaluate.tasks import load_task
    from tunesmith.model.loading import load_for_inference
    from tunesmith.model.tokenizer import load_inference_tokenizer

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(ROOT / "models" / "tiny-llama"))
    parser.add_argument("--task", default="mmlu_demo")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--random_hidden", type=int, default=0,
                        help="instead of --model, a random Llama of this width (8 layers) with the tiny tokenizer")
    args = parser.parse_args()
    if args.random_hidden:
        args.model = random_model(args.random_hidden)
    base = [f"model_name_or_path={args.model}", "template=vanilla", f"task={args.task}",
            f"task_dir={ROOT / 'evaluation'}", "n_shot=5", f"batch_size={args.batch_size}", f"infer_dtype={args.dtype}"]
    cfg = load_config(base)
    tokenizer, template = load_inference_tokenizer(cfg)
    model = load_for_inference(cfg)
    _, _, subjects = load_task(args.task, str(ROOT / "evaluation"), "validation", 5, None)
    timings, predictions = {}, {}
    for reuse in (False, True):
        cfg.eval.prefix_reuse = reuse
        evaluate_subjects(model, tokenizer, template, subjects[:1], cfg)  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            records = evaluate_subjects(model, tokenizer, template, subjects, cfg)
            best = min(best, time.perf_counter() - start)
        timings[reuse], predictions[reuse] = best, [r["predicted"] for r in records]
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"benchmark": "eval_prefix_reuse", "model": f"{Path(args.model).name} ({params / 1e6:.1f}M)", "task": args.task,
                      "n_shot": 5, "questions": len(predictions[True]), "batch_size": args.batch_size,
                      "dtype": args.dtype, "threads": torch.get_num_threads(),
                      "seconds_full_prompts": round(timings[False], 3), "seconds_prefix_reuse": round(timings[True], 3),
                      "speedup": round(timings[False] / timings[True], 2),
                      "identical_predictions": predictions[False] == predictions[True]}))


if __name__ == "__main__":
    main()
