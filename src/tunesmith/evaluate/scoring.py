"""Score multiple-choice questions by the next-token logits of the choice letters after the answer cue.

Few-shot prompts of one subject share a long prefix (instructions plus the n solved examples). With
`prefix_reuse` that prefix runs once per subject and its KV cache is reused for every batch of questions;
only the differing suffixes are computed.
"""

from __future__ import annotations

import copy
import inspect
import random
from dataclasses import dataclass
from typing import Any

import torch

from tunesmith.data.conversation import Conversation, Message
from tunesmith.evaluate.tasks import CHOICES, Question, Subject

WORDING = {
    "en": {"header": "The following are multiple choice questions (with answers) about {subject}.\n\n",
           "answer": "\nAnswer:", "space": " "},
    "zh": {"header": "以下是关于{subject}的单项选择题，请选出正确答案。\n\n", "answer": "\n答案：", "space": ""},
}


def format_question(q: Question, lang: str, answer: str | None) -> str:
    text = q.question + "".join(f"\n{letter}. {choice}" for letter, choice in zip(CHOICES, q.choices))
    text += WORDING[lang]["answer"]
    return text + (f"{WORDING[lang]['space']}{answer}\n\n" if answer else "")


def pick_shots(subject: Subject, n_shot: int, seed: int) -> list[Question]:
    return random.Random(f"{seed}-{subject.name}").sample(subject.dev, n_shot) if n_shot else []


def build_prompts(subject: Subject, template: Any, lang: str, n_shot: int, seed: int) -> list[str]:
    """One user turn per question: header, solved examples, the question and the answer cue, rendered with the
    chat template's generation prompt (with `vanilla` the text is used as is)."""
    shots = pick_shots(subject, n_shot, seed)
    head = WORDING[lang]["header"].format(subject=subject.display)
    head += "".join(format_question(s, lang, s.answer) for s in shots)
    return [template.render_prompt(Conversation([Message("user", head + format_question(q, lang, None))]))
            for q in subject.questions]


def choice_token_ids(tokenizer: Any, template: Any, lang: str) -> list[int]:
    """The token a model writes for each letter right after the cue: ` A` after `Answer:` in a plain prompt,
    `A` at the start of an assistant turn."""
    probe = template.render_prompt(Conversation([Message("user", "x")]))
    space = WORDING[lang]["space"] if probe.endswith("x") else ""  # nothing between the user text and the answer
    return [tokenizer.encode(space + letter, add_special_tokens=False)[-1] for letter in CHOICES]


@dataclass
class Scored:
    probs: list[list[float]]  # per question, softmax over the four letters


@torch.no_grad()
def score_full(model: Any, tokenizer: Any, prompts: list[str], letters: list[int], batch_size: int) -> Scored:
    """Reference path: every prompt in full (right-padded batches), logits at each prompt's last token."""
    device = next(model.parameters()).device
    probs = []
    for start in range(0, len(prompts), batch_size):
        encoded = [tokenizer.encode(p, add_special_tokens=False) for p in prompts[start : start + batch_size]]
        ids, mask = _right_pad(encoded, tokenizer.pad_token_id or 0)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        last = mask.sum(1) - 1
        probs += _letter_probs(logits[torch.arange(len(encoded)), last.to(device)], letters)
    return Scored(probs)


@torch.no_grad()
def score_with_prefix(model: Any, tokenizer: Any, prompts: list[str], letters: list[int], batch_size: int) -> Scored:
    """Run the common token prefix once; reuse its KV cache for every batch of question suffixes."""
    device = next(model.parameters()).device
    encoded = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    n = _common_prefix_len(encoded)
    n = min(n, min(len(e) for e in encoded) - 1)  # every question keeps at least its last token
    if n < 1:
        return score_full(model, tokenizer, prompts, letters, batch_size)
    out = model(input_ids=torch.tensor([encoded[0][:n]], device=device), use_cache=True)
    prefix_cache = out.cache if "cache" in out else out.past_key_values
    # transformers renamed `past_key_values` to `cache` during 5.x
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    probs, repeated = [], {}
    for start in range(0, len(encoded), batch_size):
        suffixes = [e[n:] for e in encoded[start : start + batch_size]]
        ids, mask = _right_pad(suffixes, tokenizer.pad_token_id or 0)
        cache = _fresh_cache(prefix_cache, len(suffixes), repeated)
        full_mask = torch.cat([torch.ones(len(suffixes), n, dtype=mask.dtype), mask], dim=1)
        positions = (n + torch.arange(ids.shape[1]))[None].expand(len(suffixes), -1)
        logits = model(input_ids=ids.to(device), attention_mask=full_mask.to(device),
                       position_ids=positions.to(device), use_cache=True, **{cache_arg: cache}).logits
        last = mask.sum(1) - 1
        probs += _letter_probs(logits[torch.arange(len(suffixes)), last.to(device)], letters)
    return Scored(probs)


def _fresh_cache(prefix_cache: Any, batch: int, repeated: dict[int, Any]) -> Any:
    """The prefix cache repeated to `batch` rows, ready to be extended by one forward pass. The repeated copy is
    made once per batch size; each use gets shallow layer copies (dynamic layers concatenate new keys into new
    tensors, so the shared prefix tensors are never written)."""
    if batch not in repeated:
        repeated[batch] = copy.deepcopy(prefix_cache)
        repeated[batch].batch_repeat_interleave(batch)
    template = repeated[batch]
    if not hasattr(template, "layers"):
        return copy.deepcopy(template)
    fresh = copy.copy(template)
    fresh.layers = [copy.copy(layer) for layer in template.layers]
    return fresh


def _right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def _common_prefix_len(seqs: list[list[int]]) -> int:
    first, n = seqs[0], len(seqs[0])
    for s in seqs[1:]:
        k = 0
        limit = min(n, len(s))
        while k < limit and s[k] == first[k]:
            k += 1
        n = k
    return n


def _letter_probs(last_logits: torch.Tensor, letters: list[int]) -> list[list[float]]:
    return torch.softmax(last_logits[:, letters].float(), dim=-1).tolist()
