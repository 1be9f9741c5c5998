"""A rendered conversation -> token ids and labels (-100 = no loss), with the cutoff_len rules.

Truncation keeps whole turns: later turns that do not fit are dropped. When even the first turn is too long,
message texts are shortened (the prompt first, the response only as much as needed) while every template
token stays: headers, separators and the response's end-of-turn token are never cut.
"""

from __future__ import annotations

import numpy as np

import bisect
from dataclasses import dataclass
from typing import Any

from tunesmith.data.turns import RenderedChat

IGNORE = -100  # the label of a position the loss skips (PyTorch's cross-entropy default)


def shifted(labels: "np.ndarray") -> "np.ndarray":
    """Labels -> next-token targets: position t predicts token t + 1; the last position predicts nothing."""
    out = np.full_like(labels, IGNORE)
    out[:-1] = labels[1:]
    return out


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


class Dropped(Exception):
    """A sample that cannot be kept; `reason` is counted in the data report."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def _token_roles(rendered: RenderedChat, offsets: list[tuple[int, int]]) -> tuple[list[int], list[bool], list[bool]]:
    """Per token: segment index, is-response, is-shortenable-content (by the token's first character)."""
    seg_starts = [s.start for s in rendered.segments]
    content_starts = [a for a, _ in rendered.content_spans]
    seg_of, is_response, is_content = [], [], []
    for start, end in offsets:
        k = max(bisect.bisect_right(seg_starts, start) - 1, 0)
        seg_of.append(k)
        is_response.append(rendered.segments[k].is_response)
        c = bisect.bisect_right(content_starts, start) - 1
        is_content.append(c >= 0 and start >= rendered.content_spans[c][0] and end <= rendered.content_spans[c][1])
    return seg_of, is_response, is_content


def _keep_budget(prompt_len: int, response_len: int, budget: int) -> tuple[int, int]:
    """How many prompt and response content tokens fit in `budget`: a short response is kept whole, a short
    prompt too, otherwise both shrink in proportion."""
    if response_len * 2 < budget:
        keep_response = response_len
    elif prompt_len * 2 < budget:
        keep_response = budget - prompt_len
    else:
        keep_response = int(budget * response_len / (prompt_len + response_len))
    keep_response = min(keep_response, response_len)
    return min(budget - keep_response, prompt_len), keep_response


def encode_chat(rendered: RenderedChat, tokenizer: Any, cutoff_len: int, train_on_prompt: bool = False,
                mask_history: bool = False, truncation: str = "truncate") -> Encoded:
    enc = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    seg_of, is_response, is_content = _token_roles(rendered, offsets)
    turn_of = [rendered.segments[k].turn for k in seg_of]
    turns = sorted({s.turn for s in rendered.segments if s.is_response})
    keep, cut_from = list(range(len(ids))), len(ids)  # tokens at or after cut_from are never trained
    truncated = len(ids) > cutoff_len
    if truncated:
        if truncation == "drop":
            raise Dropped("longer than cutoff_len")
        # tokens up to the end of each assistant turn
        turn_end = {t: max(i for i in range(len(ids)) if turn_of[i] == t and is_response[i]) + 1 for t in turns}
        fitting = [t for t in turns if turn_end[t] <= cutoff_len]
        if fitting:
            turns = [t for t in turns if t <= fitting[-1]]
            keep = list(range(turn_end[fitting[-1]]))
        else:
            turns = turns[:1]
            keep, cut_from = _shorten_first_turn(turn_end[turns[0]] if turns else len(ids), is_response, is_content,
                                                 cutoff_len)
    last_turn = turns[-1] if turns else -1
    input_ids, labels = [], []
    for i in keep:
        input_ids.append(ids[i])
        trained = is_response[i] and i < cut_from and (not mask_history or turn_of[i] == last_turn)
        labels.append(ids[i] if trained or (train_on_prompt and not is_response[i]) else IGNORE)
    if all(label == IGNORE for label in labels):
        raise Dropped("no supervised tokens")
    return Encoded(input_ids, labels, truncated)


def _shorten_first_turn(end: int, is_response: list[bool], is_content: list[bool],
                        cutoff_len: int) -> tuple[list[int], int]:
    """The kept token indices, and where training stops: after a cut answer's last kept text, so the end-of-turn
    token that follows is not trained (the model must not learn to stop mid-answer)."""
    fixed = [i for i in range(end) if not is_content[i]]
    prompt = [i for i in range(end) if is_content[i] and not is_response[i]]
    response = [i for i in range(end) if is_content[i] and is_response[i]]
    budget = cutoff_len - len(fixed)
    if budget < 1 or not response and not any(is_response[i] for i in fixed):
        raise Dropped("template tokens alone exceed cutoff_len")
    keep_prompt, keep_response = _keep_budget(len(prompt), len(response), budget)
    cut_from = response[keep_response] if keep_response < len(response) else end
    return sorted(fixed + prompt[:keep_prompt] + response[:keep_response]), cut_from


def encode_text(text: str, tokenizer: Any, cutoff_len: int) -> list[Encoded]:
    """Pre-training: the text (with BOS when the tokenizer adds one) plus EOS, split into cutoff_len chunks."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    chunks = [ids[i : i + cutoff_len] for i in range(0, len(ids), cutoff_len)]
    # A trailing sliver of one token has nothing to predict.
    chunks = [c for c in chunks if len(c) > 1]
    return [Encoded(c, list(c), truncated=len(chunks) > 1) for c in chunks]
