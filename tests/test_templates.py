"""Chat templates: parity with transformers' apply_chat_template, exact loss masks, named template renderings."""

from __future__ import annotations

import copy

import pytest

from tunesmith.data.conversation import Conversation, Message, ToolCall
from tunesmith.data.encode import IGNORE, encode_chat
from tunesmith.data.errors import DataError
from tunesmith.data.templates import load_template

# Five template styles, written for these tests (not copied from any model).
CHATML_TOOLS = (
    "{% if tools %}<|im_start|>system\n{{ messages[0].content if messages[0].role == 'system' else 'You help.' }}"
    "\n\nTools:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n"
    "{% elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'system' %}"
    "{% elif m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif m.role == 'tool' %}<|im_start|>user\n<tool_response>{{ m.content }}</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3_LIKE = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{{ m.content | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
MISTRAL_LIKE = (
    "{% if messages[0].role == 'system' %}{% set sys = messages[0].content ~ '\n\n' %}"
    "{% set messages = messages[1:] %}{% else %}{% set sys = '' %}{% endif %}<s>"
    "{% for m in messages %}{% if m.role == 'user' %}[INST] {{ sys if loop.first else '' }}{{ m.content }} [/INST]"
    "{% elif m.role == 'assistant' %}{{ m.content }}</s>{% endif %}{% endfor %}"
)
GEMMA_LIKE = (
    "<bos>{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
    "{{ m.content }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
SYSTEM_DEFAULT = (
    "{% if messages[0].role != 'system' %}<|system|>\nYou are a tiny helpful model.<|end|>\n{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
STYLES = {"chatml": (CHATML_TOOLS, "<|im_end|>"), "llama3": (LLAMA3_LIKE, "<|eot_id|>"),
          "mistral": (MISTRAL_LIKE, "</s>"), "gemma": (GEMMA_LIKE, "<end_of_turn>"),
          "system_default": (SYSTEM_DEFAULT, "<|end|>")}
EXTRA_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<s>", "</s>",
                "[INST]", "[/INST]", "<bos>", "<start_of_turn>", "<end_of_turn>", "<|system|>", "<|user|>",
                "<|assistant|>", "<|end|>"]

CONVERSATIONS = [
    Conversation([Message("user", "What is 2 plus 3?"), Message("assistant", "2 + 3 = 5.")]),
    Conversation([Message("user", "Remember 7."), Message("assistant", "Noted: 7."),
                  Message("user", "What did I say?"), Message("assistant", "You said 7.")],
                 system="You have a perfect memory."),
    Conversation([Message("user", "法国的首都是哪里？"), Message("assistant", "法国的首都是巴黎。")]),
]


@pytest.fixture(scope="module")
def tok(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": EXTRA_TOKENS})
    return tok


def one(sequences):
    """The single sequence a prefix-stable template renders a conversation as."""
    assert len(sequences) == 1
    return sequences[0]


def labelled_runs(ids, labels, tok):
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE:
            current.append(token)
        elif current:
            runs.append(tok.decode(current))
            current = []
    if current:
        runs.append(tok.decode(current))
    return runs


@pytest.mark.parametrize("style", sorted(STYLES))
@pytest.mark.parametrize("conv_index", range(len(CONVERSATIONS)))
def test_auto_template_matches_apply_chat_template(tok, style, conv_index):
    jinja, eot = STYLES[style]
    tok = copy.copy(tok)
    tok.chat_template = jinja
    conv = CONVERSATIONS[conv_index]
    template = load_template("auto", tok)
    enc = encode_chat(one(template.render_chat(conv)), tok, cutoff_len=4096)
    reference = tok.apply_chat_template(conv.hf_messages(), tokenize=True, return_dict=False)
    assert enc.input_ids == list(reference)
    answers = [m.content + eot for m in conv.messages if m.role == "assistant"]
    assert labelled_runs(enc.input_ids, enc.labels, tok) == answers
    assert eot in template.stop


def test_tools_and_tool_calls_match_apply_chat_template(tok):
    tok = copy.copy(tok)
    tok.chat_template = CHATML_TOOLS
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    conv = Conversation([Message("user", "Weather in Oslo?"),
                         Message("assistant", "", [ToolCall("get_weather", {"city": "Oslo"})]),
                         Message("tool", '{"weather": "sunny"}'), Message("assistant", "It is sunny.")], tools=tools)
    enc = encode_chat(one(load_template("auto", tok).render_chat(conv)), tok, cutoff_len=4096)
    reference = tok.apply_chat_template(conv.hf_messages(), tools=tools, tokenize=True, return_dict=False)
    assert enc.input_ids == list(reference)
    assert labelled_runs(enc.input_ids, enc.labels, tok) == [
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call><|im_end|>',
        "It is sunny.<|im_end|>"]


def test_mask_history_and_train_on_prompt(tok):
    tok = copy.copy(tok)
    tok.chat_template = GEMMA_LIKE
    conv = CONVERSATIONS[1]
    rendered = one(load_template("auto", tok).render_chat(conv))
    last_only = encode_chat(rendered, tok, 4096, mask_history=True)
    assert labelled_runs(last_only.input_ids, last_only.labels, tok) == ["You said 7.<end_of_turn>"]
    everything = encode_chat(rendered, tok, 4096, train_on_prompt=True)
    assert everything.labels == everything.input_ids


NAMED = {
    "default": "System: S\nHuman: hi\nAssistant:yo<|endoftext|>\n",
    "vanilla": "S\nhiyo<|endoftext|>",
    "alpaca": "S\n\n### Instruction:\nhi\n\n### Response:\nyo<|endoftext|>\n\n",
    "chatml": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n",
    "qwen": "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n",
    "llama3": "<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>"
              "\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nyo<|eot_id|>",
}


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_templates_render_as_documented(tokenizer, name):
    template = load_template(name, tokenizer)
    conv = Conversation([Message("user", "hi"), Message("assistant", "yo")], system="S")
    assert one(template.render_chat(conv)).text == NAMED[name]


def test_named_template_default_system_and_generation_prompt(tokenizer):
    template = load_template("qwen", tokenizer)
    conv = Conversation([Message("user", "hi")])
    assert template.render_prompt(conv) == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                                            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert template.stop == ["<|im_end|>"]
    alpaca = load_template("alpaca", tokenizer)
    assert alpaca.render_prompt(conv).startswith("Below is an instruction")
    assert alpaca.stop == ["<|endoftext|>"]


def test_named_template_tool_format(tokenizer):
    template = load_template("default", tokenizer)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    conv = Conversation([Message("user", "call f"), Message("assistant", "", [ToolCall("f", {"x": 1})]),
                         Message("tool", "42"), Message("assistant", "It is 42.")], tools=tools)
    text = one(template.render_chat(conv)).text
    assert text == (
        "System: Tools you can call, one JSON spec per line:\n<tools>\n"
        '{"type": "function", "function": {"name": "f", "parameters": {}}}\n</tools>\n'
        'To call tools, answer with one line per call: <tool_call>{"name": "tool name", "arguments": {...}}'
        "</tool_call>\n"
        'Human: call f\nAssistant:<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call><|endoftext|>\n'
        "Observation: 42\nAssistant:It is 42.<|endoftext|>\n")


def test_auto_without_chat_template_is_a_clear_error(tokenizer):
    tok = copy.copy(tokenizer)
    tok.chat_template = None
    with pytest.raises(DataError, match="has no chat template"):
        load_template("auto", tok)
    with pytest.raises(DataError, match="unknown template `nope`"):
        load_template("nope", tokenizer)
