"""Templates in the style of eight model families, on single-turn, multi-turn, reasoning and tool conversations:
every trained span is what the model writes at inference for that turn (its prompt is the serving prompt, token
for token), prefix-stable renderings match apply_chat_template, and the reasoning and tool forms are each
template's own."""

from __future__ import annotations

import copy
import json

import pytest

from family_templates import FAMILIES, GEMMA2, SPECIAL_TOKENS
from tunesmith.data.conversation import Conversation, Message, ToolCall
from tunesmith.data.encode import IGNORE, encode_chat
from tunesmith.data.errors import DataError
from tunesmith.data.formats import to_conversation
from tunesmith.data.readers import RawRow
from tunesmith.data.registry import DatasetSpec
from tunesmith.data.templates import load_template

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
CASES = {
    "single": Conversation([Message("user", "What is 2+3?"), Message("assistant", "5.")]),
    "multi": Conversation([Message("user", "Remember 7."), Message("assistant", "Noted."), Message("user", "What?"),
                           Message("assistant", "7.")], system="Be brief."),
    "reasoning": Conversation([Message("user", "2+3?"), Message("assistant", "5.", reasoning="2 plus 3 is 5."),
                               Message("user", "times 2?"), Message("assistant", "10.", reasoning="5 times 2 is 10.")]),
    "tools": Conversation([Message("user", "Weather in Oslo?"),
                           Message("assistant", "", [ToolCall("get_weather", {"city": "Oslo"})]),
                           Message("tool", '{"sky": "sunny"}'), Message("assistant", "Sunny.")], tools=TOOLS),
}
# sequences each conversation becomes: 1 where the template renders history as it renders the turn itself
SEQUENCES = {
    "qwen3": {"single": 1, "multi": 2, "reasoning": 2, "tools": 2},  # history drops the (empty) reasoning block
    "deepseek_r1": {"single": 1, "multi": 2, "reasoning": 2},  # history drops reasoning
    "llama3.1": {"single": 1, "multi": 1, "reasoning": 1, "tools": 1},
    "mistral": {"single": 1, "multi": 2, "reasoning": 1, "tools": 1},  # the system prompt moves to the last turn
    "gemma3": {"single": 1, "multi": 1, "reasoning": 1},
    "phi3.5": {"single": 1, "multi": 1, "reasoning": 1},
    "hermes3": {"single": 1, "multi": 1, "reasoning": 1, "tools": 1},
    "glm4.5": {"single": 1, "multi": 2, "reasoning": 2, "tools": 1},
}
# what the model must write for the last turn of the reasoning conversation, as each family writes it
LAST_REASONING_TURN = {
    "qwen3": "<think>\n5 times 2 is 10.\n</think>\n\n10.<|im_end|>",
    "deepseek_r1": "5 times 2 is 10.\n</think>\n\n10.<\uff5cend\u2581of\u2581sentence\uff5c>",  # after "<think>\n"
    "llama3.1": "<think>\n5 times 2 is 10.\n</think>\n\n10.<|eot_id|>",
    "mistral": "<think>\n5 times 2 is 10.\n</think>\n\n10.<|endoftext|>",
    "gemma3": "<think>\n5 times 2 is 10.\n</think>\n\n10.<end_of_turn>",
    "phi3.5": "<think>\n5 times 2 is 10.\n</think>\n\n10.<|end|>",
    "hermes3": "<think>\n5 times 2 is 10.\n</think>\n\n10.<|im_end|>",
    "glm4.5": "\n<think>5 times 2 is 10.</think>\n10.<|user|>",  # GLM ends a turn by writing the next header
}
TOOL_CALL_TURN = {
    "qwen3": '<think>\n\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>',
    "llama3.1": '{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eot_id|>',
    "hermes3": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>',
    "glm4.5": "\n<think></think>\n\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Oslo</arg_value>\n"
              "</tool_call><|observation|>",
}


@pytest.fixture(scope="module")
def base(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    return tok


def family(base, name, jinja=None, **settings):
    tok = copy.copy(base)
    tok.chat_template = jinja or FAMILIES[name]
    return tok, load_template(settings.pop("template", "auto"), tok, **settings)


def trained_spans(seq):
    return [(s.turn, seq.text[s.start:s.end], seq.text[:s.start]) for s in seq.segments if s.is_response]


def answer_indices(conv):
    return [i for i, m in enumerate(conv.messages) if m.role == "assistant"]


@pytest.mark.parametrize("name", sorted(SEQUENCES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_trained_spans_are_what_the_model_writes_when_served(base, name, case):
    if case not in SEQUENCES[name]:
        pytest.skip(f"{name} has no tool calls")
    tok, template = family(base, name)
    conv = CASES[case]
    sequences = template.render_chat(conv)
    assert len(sequences) == SEQUENCES[name][case]
    spans = [span for seq in sequences for span in trained_spans(seq)]
    assert sorted(turn for turn, _, _ in spans) == list(range(len(answer_indices(conv))))  # each turn trained once
    for turn, text, before in spans:
        i = answer_indices(conv)[turn]
        # the text before the span is the serving prompt of that turn
        served = template.render_prompt(Conversation(conv.messages[:i], conv.system, conv.tools))
        assert before == served
        assert text.endswith(tuple(template.stop)) and conv.messages[i].content in text
    if case == "reasoning":
        assert spans[-1][1] == LAST_REASONING_TURN[name]
    if case == "tools" and name in TOOL_CALL_TURN:
        assert spans[0][1] == TOOL_CALL_TURN[name]
    for seq in sequences:  # the token labels are exactly the spans
        enc = encode_chat(seq, tok, 4096)
        runs = [s for _, s, _ in trained_spans(seq)]
        assert tok.decode([t for t in enc.labels if t != IGNORE]) == "".join(runs)
        if seq.whole:  # parity with transformers
            reference = tok.apply_chat_template(template.messages_of(conv), tools=conv.tools, tokenize=True,
                                                return_dict=False, chat_template=template.source_for(conv.tools),
                                                **template.kwargs)
            assert enc.input_ids == list(reference)


def test_mistral_tool_calls_get_valid_ids_and_results_answer_them(base):
    _, template = family(base, "mistral")
    [seq] = template.render_chat(CASES["tools"])
    call_id = json.loads(seq.text.split("[TOOL_CALLS]")[1].split("]")[0] + "]")[0]["id"]
    assert len(call_id) == 9 and call_id.isalnum()
    assert f'"call_id": "{call_id}"' in seq.text
    assert template.render_chat(CASES["tools"])[0].text == seq.text  # stable: the cache key stays the same


def openai_row(arguments):
    return RawRow("chat.jsonl", 3, {"messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "reasoning_content": "Need the tool.",
         "tool_calls": [{"id": "Ab3dE6gH9", "type": "function",
                         "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "Ab3dE6gH9", "content": "sunny"},
        {"role": "assistant", "content": "<think>\nIt said sunny.\n</think>\n\nSunny."}], "tools": TOOLS})


def test_openai_rows_keep_ids_reasoning_and_argument_text(base):
    spec = DatasetSpec("chat", formatting="openai", columns={"messages": "messages", "tools": "tools"})
    conv = to_conversation(spec, openai_row('{"city": "Oslo"}'), "chat")
    call = conv.messages[1].tool_calls[0]
    assert (call.id, call.arguments, conv.messages[1].reasoning) == ("Ab3dE6gH9", {"city": "Oslo"}, "Need the tool.")
    assert (conv.messages[3].reasoning, conv.messages[3].content) == ("It said sunny.", "Sunny.")
    _, mistral = family(base, "mistral")
    text = mistral.render_chat(conv)[0].text
    assert '"id": "Ab3dE6gH9"' in text and '"call_id": "Ab3dE6gH9"' in text  # the data's own ids, not new ones
    _, qwen3 = family(base, "qwen3")
    last = trained_spans(qwen3.render_chat(conv)[-1])[-1][1]
    assert last == "<think>\nIt said sunny.\n</think>\n\nSunny.<|im_end|>"


def test_string_arguments_for_templates_that_want_text(base):
    jinja = ("{% for m in messages %}{{ m.role }}: {{ m.content or '' }}{% for c in m.tool_calls or [] %}"
             "CALL {{ c.function.name }} {{ c.function.arguments + '' }}{% endfor %};{% endfor %}"
             "{% if add_generation_prompt %}assistant: {% endif %}")
    _, template = family(base, "custom", jinja)
    assert template.forms.arguments == "string"  # `+ ''` raises on a mapping
    [seq] = template.render_chat(CASES["tools"])
    assert 'CALL get_weather {"city": "Oslo"}' in seq.text


def test_enable_thinking_false_and_the_llamafactory_name(base):
    for settings in ({"enable_thinking": False}, {"template": "qwen3_nothink"}):
        _, template = family(base, "qwen3", **settings)
        [seq] = template.render_chat(CASES["single"])
        assert seq.text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n5.<|im_end|>\n")
        assert [s for _, s, _ in trained_spans(seq)] == ["5.<|im_end|>"]  # the empty block is prompt
        sequences = template.render_chat(CASES["reasoning"])
        assert all("2 plus 3" not in s.text and "5 times 2" not in s.text for s in sequences)


def test_template_kwargs_reach_the_template(base):
    jinja = "{% for m in messages %}[{{ greeting }}] {{ m.content }}\n{% endfor %}"
    _, template = family(base, "custom", jinja, kwargs={"greeting": "hey"})
    assert template.render_chat(CASES["single"])[0].text.startswith("[hey] What is 2+3?")


def test_conversations_a_template_refuses_are_located_errors(base):
    _, template = family(base, "gemma2", GEMMA2)
    conv = Conversation([Message("user", "hi"), Message("assistant", "yo")], system="S", source=("d.json", 7))
    with pytest.raises(DataError, match="System role not supported") as err:
        template.render_chat(conv)
    assert (err.value.file, err.value.row) == ("d.json", 7) and "default_system" in (err.value.fix or "")
    _, gemma3 = family(base, "gemma3")
    with pytest.raises(DataError, match="does not write tool calls"):
        gemma3.render_chat(CASES["tools"])


def test_reasoning_a_template_drops_is_refused_with_the_fix(base):
    jinja = ("{% for m in messages %}{% if m.role == 'user' %}U:{{ m.content }}{% else %}A:"
             "{{ m.content.split('</think>')[-1] }}.{% endif %}{% endfor %}{% if add_generation_prompt %}A:</think>"
             "{% endif %}")
    _, template = family(base, "v3.1-like", jinja)
    assert template.forms.reasoning == "none"
    with pytest.raises(DataError, match="drops the reasoning") as err:
        template.render_chat(CASES["reasoning"])
    assert "enable_thinking: false" in err.value.fix
    _, without = family(base, "v3.1-like", jinja, enable_thinking=False)
    assert len(without.render_chat(CASES["reasoning"])) >= 1


def test_mask_history_keeps_only_the_last_turns_sequence(base, tmp_path):
    from types import SimpleNamespace

    from tunesmith.data.pipeline import DataReport, encode_conversation

    tok, template = family(base, "qwen3")
    d = SimpleNamespace(mask_history=False, cutoff_len=4096, train_on_prompt=False, truncation="truncate")
    report = DataReport()
    every = encode_conversation(CASES["multi"], template, tok, d, report)
    assert len(every) == 2 and report.expanded == 1 and report.expansion_sequences == 1
    assert report.expansion_tokens == min(len(e.input_ids) for e in every)
    d.mask_history = True
    [last] = encode_conversation(CASES["multi"], template, tok, d, DataReport())
    assert last.input_ids == every[-1].input_ids
