"""Reading answers back: reasoning split from the text (whole and streamed), tool calls parsed in each template's
style, and a Qwen3-style reasoning model trained then served with the training prompt, token for token."""

from __future__ import annotations

import copy
import json
import random

import pytest

from conftest import write_dataset
from family_templates import FAMILIES, SPECIAL_TOKENS
from tunesmith.data.conversation import Conversation, Message, ToolCall
from tunesmith.data.encode import IGNORE, encode_chat
from tunesmith.data.templates import load_template
from tunesmith.infer.reasoning import ReasoningSplitter, split_answer
from tunesmith.infer.tool_calls import parse_tool_calls

TAGS = ("<think>", "</think>")


@pytest.mark.parametrize("text,opened,expected", [
    ("<think>\nadd them\n</think>\n\n5.", False, ("add them", "5.")),
    ("add them\n</think>\n\n5.", True, ("add them", "5.")),  # the prompt opened the block
    ("5.", False, (None, "5.")),
    ("<think>\n\n</think>\n\n5.", False, ("", "5.")),
    ("<think>still thinking", False, ("still thinking", "")),  # cut by max_tokens inside the block
    ("<thin", False, (None, "<thin")),
])
def test_split_answer(text, opened, expected):
    assert split_answer(text, TAGS, opened) == expected


def test_streamed_split_equals_whole_split_at_any_piece_boundaries():
    text = "<think>\nfirst 2, then </th 3\n</think>\n\nThe answer is 5."
    rng = random.Random(0)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 12)))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        splitter = ReasoningSplitter(TAGS)
        parts = [p for piece in pieces for p in splitter.feed(piece)] + splitter.finish()
        assert "".join(t for k, t in parts if k == "reasoning") == "first 2, then </th 3"
        assert "".join(t for k, t in parts if k == "content") == "The answer is 5."


@pytest.mark.parametrize("style,written,calls", [
    ("hermes", '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>', [ToolCall("f", {"x": 1})]),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"x": 1}, "id": "Ab3dE6gH9"}, {"name": "g", "arguments": {}}]',
     [ToolCall("f", {"x": 1}, "Ab3dE6gH9"), ToolCall("g", {})]),
    ("mistral", '[TOOL_CALLS]f[ARGS]{"x": 1}', [ToolCall("f", {"x": 1})]),
    ("llama3", '{"name": "f", "parameters": {"x": 1}}', [ToolCall("f", {"x": 1})]),
    ("deepseek", "<\uff5ctool\u2581calls\u2581begin\uff5c><\uff5ctool\u2581call\u2581begin\uff5c>f<\uff5ctool\u2581sep\uff5c>"
                 '{"x": 1}<\uff5ctool\u2581call\u2581end\uff5c><\uff5ctool\u2581calls\u2581end\uff5c>', [ToolCall("f", {"x": 1})]),
    ("deepseek", "<\uff5ctool\u2581calls\u2581begin\uff5c><\uff5ctool\u2581call\u2581begin\uff5c>function<\uff5ctool\u2581sep\uff5c>f\n"
                 '```json\n{"x": 1}\n```<\uff5ctool\u2581call\u2581end\uff5c><\uff5ctool\u2581calls\u2581end\uff5c>', [ToolCall("f", {"x": 1})]),
    ("glm", "<tool_call>f\n<arg_key>x</arg_key>\n<arg_value>1</arg_value>\n<arg_key>city</arg_key>\n"
            "<arg_value>Oslo</arg_value>\n</tool_call>", [ToolCall("f", {"x": 1, "city": "Oslo"})]),
])
def test_tool_call_styles(style, written, calls):
    assert parse_tool_calls(written, style) == ("", calls)
    assert parse_tool_calls("plain text", style) == ("plain text", [])


@pytest.fixture(scope="module")
def base(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    return tok


@pytest.mark.parametrize("name", ["qwen3", "llama3.1", "mistral", "hermes3", "glm4.5"])
def test_what_a_template_writes_for_a_call_parses_back(base, name):
    tok = copy.copy(base)
    tok.chat_template = FAMILIES[name]
    template = load_template("auto", tok)
    call = ToolCall("get_weather", {"city": "Oslo"})
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    conv = Conversation([Message("user", "Weather?"), Message("assistant", "", [call])], tools=tools)
    seq = template.render_chat(conv)[-1]
    [span] = [seq.text[s.start:s.end] for s in seq.segments if s.is_response]
    for stop in template.stop:
        span = span.removesuffix(stop)
    reasoning, text = split_answer(span, template.reasoning_tags)
    text, calls = parse_tool_calls(text, template.forms.call_style)
    assert text == "" and [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Oslo"})]


def reasoning_rows():
    return [{"messages": [
        {"role": "user", "content": f"What is {i} plus {i + 1}?"},
        {"role": "assistant", "reasoning_content": f"{i} and {i + 1} make {2 * i + 1}.", "content": f"{2 * i + 1}."},
        {"role": "user", "content": "And doubled?"},
        {"role": "assistant", "content": f"<think>\nTwice {2 * i + 1}.\n</think>\n\n{4 * i + 2}."}]}
        for i in range(8)]


def test_qwen3_reasoning_trained_then_served_with_the_training_prompt(tmp_path, base):
    from tunesmith.cli import main
    from tunesmith.config import load_config
    from tunesmith.data.pipeline import EncodedSet
    from tunesmith.model.tokenizer import load_inference_tokenizer
    from tunesmith.serve.protocol import to_conversation

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    model = tmp_path / "qwen3-like"
    tok = copy.copy(base)
    tok.chat_template = FAMILIES["qwen3"]
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(model)
    tok.save_pretrained(model)
    data = tmp_path / "data"
    write_dataset(data, "think", reasoning_rows(), {"formatting": "openai"}, suffix=".jsonl")
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert main(["train", f"model_name_or_path={model}", f"dataset_dir={data}", "dataset=think", f"output_dir={out}",
                 f"data_cache_dir={cache}", "max_steps=2", "per_device_train_batch_size=2", "save_strategy=no",
                 "disable_tqdm=true", "cutoff_len=256", "infer_dtype=float32"]) == 0
    [folder] = [p for p in cache.iterdir() if p.is_dir()]
    train = EncodedSet.load(folder / "train.npz")
    assert len(train) == 16  # two sequences per conversation: history drops the first turn's reasoning
    ids, labels = train[1]  # the second turn of the first conversation
    first_trained = next(i for i, label in enumerate(labels) if label != IGNORE)
    # a client sends the history back as the API returned it: the answer, its reasoning beside it
    body = {"messages": [
        {"role": "user", "content": "What is 0 plus 1?"},
        {"role": "assistant", "content": "1.", "reasoning_content": "0 and 1 make 1."},
        {"role": "user", "content": "And doubled?"}]}
    cfg = load_config([f"model_name_or_path={model}", f"adapter_name_or_path={out}"])
    served_tok, template = load_inference_tokenizer(cfg)
    served = served_tok.encode(template.render_prompt(to_conversation(body)), add_special_tokens=False)
    assert served == ids[:first_trained].tolist()
    assert served_tok.decode(ids[first_trained:].tolist()) == "<think>\nTwice 1.\n</think>\n\n2.<|im_end|>"
    saved = json.loads((out / "tunesmith_template.json").read_text())
    assert saved["enable_thinking"] is True and saved["stop"][0] == "<|im_end|>"
