"""`tunesmith predict`: batched greedy equals one-at-a-time, metrics on fixed strings, classic spelling,
unlabelled data, the vLLM backend where it exists."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from conftest import DATA_DIR, TINY_MODEL, write_dataset
from tunesmith.cli import main
from tunesmith.config import ConfigError, load_config
from tunesmith.predict.metrics import sample_scores, score


def engine(max_new_tokens=24):
    from tunesmith.data.templates import load_template
    from tunesmith.infer.hf import HFEngine
    from tunesmith.model.loading import load_for_inference
    from tunesmith.model.tokenizer import load_tokenizer

    cfg = load_config([f"model_name_or_path={TINY_MODEL}", "infer_dtype=float32", f"max_new_tokens={max_new_tokens}"])
    tokenizer = load_tokenizer(cfg)
    template = load_template("chatml", tokenizer)
    return HFEngine(load_for_inference(cfg), tokenizer, template.stop, cfg.generation), template


def test_batched_greedy_equals_one_at_a_time():
    from tunesmith.data.conversation import Conversation, Message

    hf, template = engine()
    questions = ["What is the capital of France?", "What is 12 plus 30?", "法国的首都是哪里？",
                 "Sort these numbers from smallest to largest.\n9, 3, 7", "Spell the word backwards.\nriver", "Hi"]
    prompts = [template.render_prompt(Conversation([Message("user", q)])) for q in questions]
    ids = [hf.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    batched = hf.generate_ids(ids, batch_size=4)
    single = [hf.generate_ids([one], batch_size=1)[0] for one in ids]
    assert batched == single
    assert any(len(out) > 3 for out in single)
    assert all(hf.config.eos_token_id[0] not in out for out in batched)  # stop token removed


def test_metrics_on_fixed_strings():
    same = sample_scores("今天天气很好", "今天天气很好")
    assert same == {"rouge-1": pytest.approx(100, abs=1e-3), "rouge-2": pytest.approx(100, abs=1e-3),
                    "rouge-l": pytest.approx(100, abs=1e-3), "bleu-4": pytest.approx(100), "exact_match": 100.0}
    english = sample_scores("the cat sat", "the cat ran")
    assert english["rouge-1"] == pytest.approx(66.6667, abs=1e-3)  # 2 of 3 words, both ways
    assert english["rouge-2"] == pytest.approx(50.0, abs=1e-3)     # 1 of 2 bigrams
    assert english["rouge-l"] == pytest.approx(66.6667, abs=1e-3)  # LCS "the cat"
    # characters: 1-grams 3/4, 2-grams 2/3, 3-grams 1/2, 4-grams 0/1 -> method 3 gives 1/2; equal lengths
    assert sample_scores("abcd", "abce")["bleu-4"] == pytest.approx(100 * (0.75 * 2 / 3 * 0.5 * 0.5) ** 0.25, abs=1e-3)
    empty = sample_scores("", "法国的首都是巴黎。")
    assert empty == {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0, "exact_match": 0.0}
    averaged = score(["今天天气很好", ""], ["今天天气很好", "x"])
    assert averaged["predict_rouge-1"] == pytest.approx(50, abs=1e-3)
    assert averaged["predict_exact_match"] == 50.0


def test_classic_spelling_writes_predictions_in_dataset_order(tmp_path):
    out = tmp_path / "pred"
    code = main(["train", "--stage", "sft", "--do_train", "false", "--do_predict", "--model_name_or_path",
                 str(TINY_MODEL), "--dataset", "alpaca_en_demo", "--dataset_dir", str(DATA_DIR), "--template",
                 "chatml", "--output_dir", str(out), "--per_device_eval_batch_size", "8", "--max_samples", "12",
                 "--predict_with_generate", "--max_new_tokens", "16"])
    assert code == 0
    rows = [json.loads(l) for l in (out / "generated_predictions.jsonl").read_text().splitlines()]
    source = json.loads((DATA_DIR / "alpaca_en_demo.json").read_text())[:12]
    assert [r["label"] for r in rows] == [s["output"] for s in source]
    assert all(set(r) == {"prompt", "predict", "label"} for r in rows)
    results = json.loads((out / "predict_results.json").read_text())
    assert {"predict_bleu-4", "predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_exact_match",
            "predict_runtime", "predict_samples_per_second", "predict_generated_tokens_per_second"} <= set(results)


def test_unlabelled_dataset_still_predicts(tmp_path, capsys):
    write_dataset(tmp_path, "questions", [{"instruction": "What is 2 plus 2?"}, {"instruction": "Say hi"}])
    out = tmp_path / "out"
    assert main(["predict", f"model_name_or_path={TINY_MODEL}", "dataset=questions", f"dataset_dir={tmp_path}",
                 "template=chatml", f"output_dir={out}", "max_new_tokens=8"]) == 0
    assert "metrics omitted" in capsys.readouterr().out
    results = json.loads((out / "predict_results.json").read_text())
    assert "predict_bleu-4" not in results and results["predict_samples"] == 2


def test_vllm_backend_errors_clearly_when_missing():
    from tunesmith.infer.vllm import sampling_kwargs

    cfg = load_config(["do_sample=true", "temperature=0.5", "top_p=0.9", "top_k=20", "max_new_tokens=7"])
    assert sampling_kwargs(cfg.generation, ["<|im_end|>"]) == {"max_tokens": 7, "repetition_penalty": 1.0,
                                                    "stop": ["<|im_end|>"], "temperature": 0.5, "top_p": 0.9,
                                                    "top_k": 20}
    cfg.generation.do_sample = False
    assert sampling_kwargs(cfg.generation, [])["temperature"] == 0.0
    if importlib.util.find_spec("vllm") is None:
        from tunesmith.infer.vllm import import_vllm

        with pytest.raises(ConfigError, match="needs vLLM, which is not installed"):
            import_vllm()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(),
                    reason="vLLM is not installed here or there is no CUDA GPU")
def test_vllm_greedy_matches_hf(tmp_path):
    out_hf, out_vllm = tmp_path / "hf", tmp_path / "vllm"
    common = [f"model_name_or_path={TINY_MODEL}", "dataset=alpaca_en_demo", f"dataset_dir={DATA_DIR}",
              "template=chatml", "max_samples=8", "max_new_tokens=16", "infer_dtype=float32"]
    assert main(["predict", *common, f"output_dir={out_hf}"]) == 0
    assert main(["predict", *common, f"output_dir={out_vllm}", "infer_backend=vllm"]) == 0
    read = lambda p: [json.loads(l)["predict"] for l in (p / "generated_predictions.jsonl").read_text().splitlines()]  # noqa: E731
    assert read(out_hf) == read(out_vllm)


def test_vllm_engine_arguments_follow_the_adapter_and_llamafactory_keys(tmp_path):
    """What the vLLM engine is asked for (runs without vLLM): the adapter's rank, LLaMA-Factory's vllm_* keys."""
    from tunesmith.config import load_config
    from tunesmith.infer.vllm import engine_kwargs

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 48}')
    cfg = load_config(["model_name_or_path=m", "vllm_maxlen=8192", "vllm_gpu_util=0.5", "vllm_enforce_eager=true",
                       "vllm_config={tensor_parallel_size: 4, max_num_seqs: 8}"])
    kwargs = engine_kwargs(cfg, [str(adapter)])
    assert kwargs["max_lora_rank"] == 64 and kwargs["enable_lora"] is True
    assert (kwargs["max_model_len"], kwargs["gpu_memory_utilization"], kwargs["enforce_eager"]) == (8192, 0.5, True)
    assert (kwargs["tensor_parallel_size"], kwargs["max_num_seqs"]) == (4, 8)
    assert "max_lora_rank" not in engine_kwargs(load_config(["model_name_or_path=m"]), [])


def test_reasoning_is_split_off_before_scoring(tmp_path, monkeypatch):
    import tunesmith.predict.run as predict_run
    from tunesmith.infer.hf import Generation

    class Thinker:  # answers every prompt right, after a reasoning block
        def generate(self, prompts, batch_size, progress=False):
            return [Generation(f"<think>\nworking on it\n</think>\n\n{answer}", 9) for answer in ("4", "6")][:len(prompts)]

    monkeypatch.setattr(predict_run, "make_engine", lambda *args: Thinker())
    write_dataset(tmp_path, "sums", [{"instruction": "2 plus 2?", "output": "<think>\n2 and 2\n</think>\n\n4"},
                                     {"instruction": "3 plus 3?", "output": "6"}])
    out = tmp_path / "out"
    assert main(["predict", f"model_name_or_path={TINY_MODEL}", "dataset=sums", f"dataset_dir={tmp_path}",
                 "template=chatml", f"output_dir={out}"]) == 0
    rows = [json.loads(l) for l in (out / "generated_predictions.jsonl").read_text().splitlines()]
    assert [(r["predict"], r["reasoning"], r["label"]) for r in rows] == [("4", "working on it", "4"),
                                                                          ("6", "working on it", "6")]
    assert json.loads((out / "predict_results.json").read_text())["predict_exact_match"] == 100.0
