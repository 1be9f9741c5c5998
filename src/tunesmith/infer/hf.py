"""Batched generation with transformers: prompts sorted by length, left padding, the KV cache, stop tokens.

Sorting puts prompts of similar length together so little padding is computed; results come back in the
caller's order.
"""

from __future__ import annotations

from typing import Any

import torch

from tunesmith.config.fields import GenerationArgs
from tunesmith.infer import Generation


def stop_ids(tokenizer: Any, stops: list[str]) -> list[int]:
    """Stop strings that are single tokens (end-of-turn markers usually are)."""
    ids = []
    for text in stops + [tokenizer.eos_token]:
        if not text:
            continue
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(encoded[0])
    return ids


def sharded_across_processes(model: Any) -> bool:
    """A model sharded by tunesmith's FSDP (train/fsdp.py) over several processes: every forward is collective,
    so a process whose answers are done keeps stepping until every process is done (generate's synced_gpus)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule) and dist.is_initialized() and dist.get_world_size() > 1


class HFEngine:
    def __init__(self, model: Any, tokenizer: Any, stops: list[str], args: GenerationArgs):
        from transformers import GenerationConfig

        self.model, self.tokenizer, self.stops = model, tokenizer, stops
        eos = stop_ids(tokenizer, stops)
        sample = args.do_sample
        self.config = GenerationConfig(
            max_new_tokens=args.max_new_tokens, do_sample=sample, num_beams=args.num_beams,
            temperature=args.temperature if sample else None, top_p=args.top_p if sample else None,
            top_k=args.top_k if sample else None, repetition_penalty=args.repetition_penalty,
            eos_token_id=eos, pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0])
        # stops that are several tokens long are matched as text
        self.text_stops = [s for s in stops if s and len(tokenizer.encode(s, add_special_tokens=False)) > 1]

    def cut_at_stop(self, text: str) -> str:
        for stop in self.text_stops:
            if stop in text:
                text = text[: text.index(stop)]
        return text

    @torch.no_grad()
    def generate_ids(self, prompt_ids: list[list[int]], batch_size: int, progress: bool = False,
                     keep_stop: bool = False) -> list[list[int]]:
        """New token ids per prompt, in the given order; the stop token excluded, or kept with `keep_stop` (what
        training on generated answers needs, so that stopping is learnt)."""
        from tqdm.auto import tqdm

        device = next(self.model.parameters()).device
        bar = tqdm(total=len(prompt_ids), desc="predict", unit="sample", disable=not progress, dynamic_ncols=True)
        order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
        results: list[list[int]] = [[] for _ in prompt_ids]
        pad = self.config.pad_token_id
        stops = set(self.config.eos_token_id or [])
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(prompt_ids[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):  # left padding: every prompt ends at the same position
                ids[row, width - len(prompt_ids[i]) :] = torch.tensor(prompt_ids[i])
                mask[row, width - len(prompt_ids[i]) :] = 1
            out = self.run_generate(ids.to(device), mask.to(device))
            for row, i in enumerate(chunk):
                new = out[row, width:].tolist()
                cut = next((k for k, t in enumerate(new) if t in stops), len(new))
                results[i] = new[: cut + 1] if keep_stop and cut < len(new) else new[:cut]
            bar.update(len(chunk))
        bar.close()
        return results

    def run_generate(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not sharded_across_processes(self.model):
            return self.model.generate(input_ids=ids, attention_mask=mask, generation_config=self.config)
        # peft's generate calls the model inside it, past the hooks that gather the outermost FSDP group's weights
        # (embeddings, norm, head): gather them for the whole generation
        self.model.unshard()
        try:
            return self.model.generate(input_ids=ids, attention_mask=mask, generation_config=self.config,
                                       synced_gpus=True)
        finally:
            self.model.reshard()

    def generate(self, prompts: list[str], batch_size: int, progress: bool = False) -> list[Generation]:
        prompt_ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        outputs = []
        for ids in self.generate_ids(prompt_ids, batch_size, progress):
            text = self.cut_at_stop(self.tokenizer.decode(ids, skip_special_tokens=True))
            outputs.append(Generation(text.strip(), len(ids)))
        return outputs
