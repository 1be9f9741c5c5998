"""A reward model: the causal LM (with its adapter, if any) plus a scalar value head on the last hidden state.

The head is saved as value_head.safetensors (`v_head.weight` [1, hidden], `v_head.bias` [1]) beside the adapter
or model. Without tunesmith: load the model (and adapter), run it with output_hidden_states=True, take the
final hidden state at the last real token and apply `weight @ h + bias`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tunesmith.model.attention import BOUNDS_KWARG

HEAD_FILE = "value_head.safetensors"


class RewardModel(torch.nn.Module):
    def __init__(self, lm: Any, hidden_size: int, seed: int = 0):
        super().__init__()
        self.lm = lm
        self.v_head = torch.nn.Linear(hidden_size, 1)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.v_head.weight.normal_(0.0, hidden_size**-0.5, generator=gen)
            self.v_head.bias.zero_()

    def forward(self, batch: Any) -> torch.Tensor:
        """One score per sequence of a padding-free pair batch."""
        last = torch.tensor([b - 1 for b in batch.seq_bounds[1:]], device=batch.input_ids.device)
        out = self.lm(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                      output_hidden_states=True, logits_to_keep=last, **{BOUNDS_KWARG: batch.seq_bounds})
        hidden = out.hidden_states[-1][0, last]
        return self.v_head(hidden.float()).squeeze(-1)

    # peft-style helpers the loop and checkpoints use
    def save_pretrained(self, out: Path, **kwargs: Any) -> None:
        from safetensors.torch import save_file

        self.lm.save_pretrained(out, **kwargs)
        save_file({f"v_head.{k}": v.detach().contiguous().cpu() for k, v in self.v_head.state_dict().items()},
                  str(Path(out) / HEAD_FILE))

    def load_head(self, folder: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(Path(folder) / HEAD_FILE))
        self.v_head.load_state_dict({k.removeprefix("v_head."): v for k, v in state.items()})


def score_sequences(lm: Any, head_dir: str, tokenizer: Any, texts: list[str]) -> list[float]:
    """Scores of rendered texts with a saved value head (used by predict for stage rm)."""
    from tunesmith.data.pairs import PairBatch

    model = RewardModel(lm, lm.config.hidden_size)
    model.load_head(Path(head_dir))
    model.to(next(lm.parameters()).device).eval()
    scores = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer.encode(text, add_special_tokens=False)
            batch = PairBatch(torch.tensor([ids]), torch.arange(len(ids))[None], torch.tensor([ids]), [0, len(ids)], [0])
            scores.append(float(model(batch.to(next(lm.parameters()).device))[0]))
    return scores
