"""Batched greedy prediction: tunesmith predict vs LLaMA-Factory's do_predict, same tiny model, data and batch size.

    python benchmarks/compare_predict.py [--samples 200] [--batch_size 8] [--max_new_tokens 64]

Uses the LLaMA-Factory virtual environment of compare_llamafactory.py (created if missing). Both run in fp32 with
greedy decoding and a template that adds nothing around the text (tunesmith `vanilla`, LLaMA-Factory `empty`).
Prints one JSON line: each tool's generation time (its own `predict_runtime`) and wall time, the ratio, whether
tunesmith's batched outputs equal its one-sample-at-a-time outputs, and how many predictions match LLaMA-Factory's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_llamafactory import BENCH, ROOT, ensure_llamafactory, run_measured  # noqa: E402


def write_data(folder: Path, samples: int) -> None:
    rows = json.loads((ROOT / "data" / "alpaca_en_demo.json").read_text())[:samples]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench_predict.json").write_text(json.dumps(rows))
    (folder / "dataset_info.json").write_text(json.dumps({"bench_predict": {"file_name": "bench_predict.json"}}))


def one_at_a_time_equal(outputs: list[str], prompts: list[str], max_new_tokens: int) -> bool:
    from tunesmith.config import load_config
    from tunesmith.data.templates import load_template
    from tunesmith.infer.hf import HFEngine
    from tunesmith.model.loading import load_for_inference
    from tunesmith.model.tokenizer import load_tokenizer

    cfg = load_config([f"model_name_or_path={ROOT / 'models' / 'tiny-llama'}", "infer_dtype=float32",
                       f"max_new_tokens={max_new_tokens}"])
    tokenizer = load_tokenizer(cfg)
    engine = HFEngine(load_for_inference(cfg), tokenizer, load_template("vanilla", tokenizer).stop, cfg.generation)
    return [engine.generate([p], 1)[0].text for p in prompts] == outputs


def main() -> None:
    import yaml

    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    args = parser.parse_args()
    lf_cli = ensure_llamafactory()
    work = BENCH / "predict"
    data = work / "data"
    write_data(data, args.samples)
    common = {"model_name_or_path": str(ROOT / "models" / "tiny-llama"), "stage": "sft", "do_train": False,
              "do_predict": True, "predict_with_generate": True, "finetuning_type": "lora", "dataset_dir": str(data),
              "cutoff_len": 1024, "max_samples": args.samples, "per_device_eval_batch_size": args.batch_size,
              "max_new_tokens": args.max_new_tokens, "do_sample": False, "overwrite_output_dir": True,
              "report_to": "none"}
    results = {}
    for tool in ("tunesmith", "llamafactory"):
        out = work / f"out-{tool}"
        shutil.rmtree(out, ignore_errors=True)
        if tool == "tunesmith":
            cfg = common | {"dataset": "bench_predict", "template": "vanilla", "infer_dtype": "float32",
                            "output_dir": str(out)}
            cmd = [sys.executable, "-m", "tunesmith.cli", "predict"]
        else:
            cfg = common | {"eval_dataset": "bench_predict", "template": "empty", "output_dir": str(out),
                            "use_cpu": True, "preprocessing_num_workers": 1}
            cmd = [str(lf_cli), "train"]
        path = work / f"{tool}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        wall, rss = run_measured(cmd + [str(path)], work / f"{tool}.log")
        metrics = json.loads((out / "predict_results.json").read_text())
        rows = [json.loads(l) for l in (out / "generated_predictions.jsonl").read_text().splitlines()]
        results[tool] = {"wall_s": round(wall, 1), "predict_s": round(metrics["predict_runtime"], 2),
                         "peak_rss_mb": round(rss), "rows": rows}
    ts, lf = results["tunesmith"], results["llamafactory"]
    same_lf = sum(a["predict"].strip() == b["predict"].strip() for a, b in zip(ts["rows"], lf["rows"]))
    batched_equal = one_at_a_time_equal([r["predict"] for r in ts["rows"]], [r["prompt"] for r in ts["rows"]],
                                        args.max_new_tokens)
    print(json.dumps({"benchmark": "compare_predict", "samples": args.samples, "batch_size": args.batch_size,
                      "max_new_tokens": args.max_new_tokens,
                      "tunesmith": {k: v for k, v in ts.items() if k != "rows"},
                      "llamafactory": {k: v for k, v in lf.items() if k != "rows"},
                      "speedup_predict": round(lf["predict_s"] / ts["predict_s"], 2),
                      "speedup_wall": round(lf["wall_s"] / ts["wall_s"], 2),
                      "tunesmith_batched_equals_one_at_a_time": batched_equal,
                      "predictions_equal_to_llamafactory": f"{same_lf}/{len(ts['rows'])}"}))


if __name__ == "__main__":
    main()
