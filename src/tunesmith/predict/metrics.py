"""Prediction metrics, defined as LLaMA-Factory users know them so numbers stay comparable.

Per sample, then averaged over samples and multiplied by 100:
- rouge-1 / rouge-2 / rouge-l: F-measures of `rouge-chinese` over jieba-segmented words (0 when either side
  has no words);
- bleu-4: NLTK `sentence_bleu` over characters with smoothing method 3;
- exact_match: prediction == label after stripping whitespace.
Extras, clearly named: `corpus_bleu_sacrebleu` is sacrebleu's word-level corpus BLEU (13a tokenizer), suited to
non-Chinese text.
"""

from __future__ import annotations

import logging
from typing import Any


def _imports() -> tuple[Any, Any, Any, Any]:
    try:
        import jieba
        from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
        from rouge_chinese import Rouge
    except ImportError:
        from tunesmith.config.loader import ConfigError

        raise ConfigError(["prediction metrics need jieba, nltk and rouge-chinese: pip install 'tunesmith[metrics]'"]) \
            from None
    jieba.setLogLevel(logging.WARNING)
    return jieba, Rouge, sentence_bleu, SmoothingFunction


def sample_scores(prediction: str, label: str) -> dict[str, float]:
    jieba, Rouge, sentence_bleu, SmoothingFunction = _imports()
    hypothesis, reference = " ".join(jieba.cut(prediction)), " ".join(jieba.cut(label))
    if not hypothesis.split() or not reference.split():
        rouge = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    else:
        scores = Rouge().get_scores(hypothesis, reference)[0]
        rouge = {k: v["f"] for k, v in scores.items()}
    bleu = sentence_bleu([list(label)], list(prediction), smoothing_function=SmoothingFunction().method3)
    return {**{k: round(v * 100, 4) for k, v in rouge.items()}, "bleu-4": round(bleu * 100, 4),
            "exact_match": 100.0 * (prediction.strip() == label.strip())}


def corpus_bleu(predictions: list[str], labels: list[str]) -> float | None:
    try:
        import sacrebleu
    except ImportError:
        return None
    return round(sacrebleu.corpus_bleu(predictions, [labels]).score, 4)


def score(predictions: list[str], labels: list[str]) -> dict[str, float]:
    """predict_rouge-1, predict_rouge-2, predict_rouge-l, predict_bleu-4, predict_exact_match (+ extras)."""
    per_sample = [sample_scores(p, l) for p, l in zip(predictions, labels)]
    keys = ["rouge-1", "rouge-2", "rouge-l", "bleu-4", "exact_match"]
    metrics = {f"predict_{k}": round(sum(s[k] for s in per_sample) / len(per_sample), 4) for k in keys}
    extra = corpus_bleu(predictions, labels)
    if extra is not None:
        metrics["predict_corpus_bleu_sacrebleu"] = extra
    return metrics
