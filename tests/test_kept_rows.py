"""The last decoder layer at supervised positions only: same loss and gradients, same weights' names."""

import numpy as np
import pytest
import torch

from tunesmith.data.batching import collate
from tunesmith.data.encode import Encoded
from tunesmith.data.pipeline import EncodedSet
from tunesmith.model import kept_rows
from tunesmith.model.attention import register
from tunesmith.train.loss import token_loss_sum


def prompt_answer_set(n=6, vocab=2000, seed=1):
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        prompt, answer = int(rng.integers(3, 20)), int(rng.integers(2, 15))
        ids = rng.integers(0, vocab, prompt + answer).tolist()
        samples.append(Encoded(ids, [-100] * prompt + ids[prompt:]))
    return EncodedSet.from_samples(samples)


def lora_model(path, seed=0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.set_attn_implementation(register())
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(model, config)


def loss_and_grads(model, batch, kept):
    model.zero_grad()
    with torch.enable_grad():  # whatever an earlier test left switched off
        loss, count = token_loss_sum(model, batch, kept_rows=kept)
        loss.backward()
    return float(loss.detach()), count, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("padding_free", [True, False])
def test_kept_rows_give_the_same_loss_and_gradients(tiny_model_dir, padding_free):
    data = prompt_answer_set()
    batch = collate(data, [list(range(len(data)))] if padding_free else [[i] for i in range(len(data))],
                    padding_free, pad_id=0)
    reference = lora_model(tiny_model_dir)
    keys = list(reference.state_dict())
    model = lora_model(tiny_model_dir)
    assert kept_rows.install(model, model.config.vocab_size)
    assert isinstance(kept_rows.decoder_layers(model)[-1], kept_rows.LastLayerAtKeptRows)
    assert list(model.state_dict()) == keys  # adapters and checkpoints keep their names
    want_loss, want_count, want = loss_and_grads(reference, batch, kept=False)
    loss, count, grads = loss_and_grads(model, batch, kept=True)
    assert count == want_count == data.supervised_tokens()
    assert loss == pytest.approx(want_loss, rel=1e-6)
    assert grads.keys() == want.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_without_the_keyword_the_layer_is_the_original(tiny_model_dir):
    model = lora_model(tiny_model_dir).eval()
    ids = torch.randint(0, 2000, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert kept_rows.install(model, model.config.vocab_size)
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)


def test_unknown_layers_are_left_alone(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    layers = kept_rows.decoder_layers(model)
    original = layers[-1]
    layers[-1] = torch.nn.Identity()  # not a pre-norm decoder layer
    assert not kept_rows.install(model, model.config.vocab_size)
    layers[-1] = original


def test_a_layer_that_breaks_the_check_is_restored(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    original = kept_rows.decoder_layers(model)[-1]
    # a layer whose real forward differs from the pre-norm block (e.g. an extra norm) must fail the check
    monkeypatch.setattr(kept_rows.LastLayerAtKeptRows, "forward",
                        lambda self, h, **kw: (h + self.self_attn(hidden_states=self.input_layernorm(h),
                                                                  **{k: v for k, v in kw.items()
                                                                     if k != kept_rows.KEEP_ROWS_KWARG})[0]
                                               )[:, kw[kept_rows.KEEP_ROWS_KWARG]]
                        if kept_rows.KEEP_ROWS_KWARG in kw else original(h, **kw))
    assert not kept_rows.install(model, model.config.vocab_size)
    assert kept_rows.decoder_layers(model)[-1] is original
