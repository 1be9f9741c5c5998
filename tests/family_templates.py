"""Chat templates written for these tests in the style of popular model families: each reproduces the behaviour
of its family's published template that matters for training (where reasoning goes, what history drops, where
system prompts and tools land, how tool calls and results are written, how a turn ends). Written here, not
copied; the special tokens are the families' own so the tests read like the real formats."""

NL = "{{ '\\n' }}"

# Qwen3: reasoning as `reasoning_content` (or a <think> block in the content); only turns after the last user
# query keep it (the last turn always gets a block, empty if need be); tools in the system turn; tool results
# grouped into a user turn; enable_thinking=false puts an empty block in the generation prompt.
QWEN3 = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n\nYou may call functions. Signatures:\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n"
    "</tools>\nReturn each call as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>" + NL +
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>" + NL +
    "{%- endif %}"
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_query = loop.index0 %}{% endif %}{% endfor %}"
    "{%- for m in messages %}"
    "{%- set content = m.content if m.content is string else '' %}"
    "{%- if m.role == 'user' %}<|im_start|>user\n{{ content }}<|im_end|>" + NL +
    "{%- elif m.role == 'assistant' %}"
    "{%- set reasoning = m.reasoning_content if m.reasoning_content is string else '' %}"
    "{%- if not reasoning and '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{% endif %}"
    "<|im_start|>assistant\n"
    "{% if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
    "{{ '<think>\\n' ~ reasoning.strip('\\n') ~ '\\n</think>\\n\\n' }}{% endif %}"
    "{{ content.lstrip('\\n') }}"
    "{%- for c in m.tool_calls or [] %}{% if content or not loop.first %}" + NL + "{% endif %}"
    "{{ '<tool_call>\\n{\"name\": \"' ~ c.function.name ~ '\", \"arguments\": ' }}"
    "{{ c.function.arguments if c.function.arguments is string else c.function.arguments | tojson }}"
    "{{ '}\\n</tool_call>' }}{% endfor %}<|im_end|>" + NL +
    "{%- elif m.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}"
    "{{ '\\n<tool_response>\\n' ~ content ~ '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>" + NL + "{% endif %}"
    "{%- endif %}{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{%- endif %}"
)

# DeepSeek-R1 distills (QwQ alike): the generation prompt opens the reasoning block; every rendered assistant turn
# keeps only what follows </think>; system prompts go first.
R1 = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{%- for m in messages %}{% if m.role == 'system' %}{% set ns.system = m.content %}{% endif %}{% endfor %}"
    "{{ ns.system }}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' %}<\uff5cUser\uff5c>{{ m.content }}"
    "{%- elif m.role == 'assistant' %}{% set c = m.content %}"
    "{%- if '</think>' in c %}{% set c = c.split('</think>')[-1] %}{% endif %}"
    "<\uff5cAssistant\uff5c>{{ c }}<\uff5cend\u2581of\u2581sentence\uff5c>"
    "{%- endif %}{% endfor %}"
    "{%- if add_generation_prompt %}<\uff5cAssistant\uff5c><think>" + NL + "{% endif %}"
)

# Llama 3.1: a dated system header; tools in the first user message; one JSON call per turn ("parameters");
# results in an ipython turn.
LLAMA31 = (
    "{{ bos_token }}"
    "{%- if messages[0].role == 'system' %}{% set sys = messages[0].content | trim %}"
    "{% set messages = messages[1:] %}{% else %}{% set sys = '' %}{% endif %}"
    "<|start_header_id|>system<|end_header_id|>\n\n{% if tools %}Environment: ipython\n{% endif %}"
    "Cutting Knowledge Date: December 2023\n\n{{ sys }}<|eot_id|>"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' %}<|start_header_id|>user<|end_header_id|>\n\n"
    "{% if tools and loop.first %}Given the following functions, reply with a JSON call.\n\n"
    "{% for t in tools %}{{ t | tojson(indent=4) }}\n\n{% endfor %}{% endif %}{{ m.content | trim }}<|eot_id|>"
    "{%- elif m.role == 'assistant' and m.tool_calls %}"
    "{%- if m.tool_calls | length != 1 %}{{ raise_exception('This model only supports single tool-calls at once!') }}"
    "{%- endif %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{{ '{\"name\": \"' ~ m.tool_calls[0].function.name ~ '\", \"parameters\": ' }}"
    "{{ m.tool_calls[0].function.arguments | tojson }}{{ '}' }}<|eot_id|>"
    "{%- elif m.role == 'assistant' %}<|start_header_id|>assistant<|end_header_id|>\n\n{{ m.content | trim }}<|eot_id|>"
    "{%- elif m.role in ('tool', 'ipython') %}<|start_header_id|>ipython<|end_header_id|>\n\n"
    "{{ m.content }}<|eot_id|>{% endif %}{% endfor %}"
    "{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# Mistral (v3, tekken style): the system prompt and the tools go with the last user turn; tool calls carry
# 9-character ids (anything else raises); results name the call they answer.
MISTRAL = (
    "{%- if messages[0].role == 'system' %}{% set sys = messages[0].content %}{% set msgs = messages[1:] %}"
    "{%- else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in msgs %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{{ bos_token }}{% for m in msgs %}"
    "{%- if m.role == 'user' %}"
    "{%- if tools and loop.index0 == ns.last_user %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "[INST]{% if sys and loop.index0 == ns.last_user %}{{ sys ~ '\\n\\n' }}{% endif %}{{ m.content }}[/INST]"
    "{%- elif m.role == 'assistant' and m.tool_calls %}[TOOL_CALLS]["
    "{%- for c in m.tool_calls %}"
    "{%- if c.id is not string or c.id | length != 9 %}"
    "{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{% endif %}"
    "{{ '{\"name\": \"' ~ c.function.name ~ '\", \"arguments\": ' ~ (c.function.arguments | tojson) ~ ', \"id\": \"' ~ c.id ~ '\"}' }}"
    "{%- if not loop.last %}, {% endif %}{% endfor %}]{{ eos_token }}"
    "{%- elif m.role == 'assistant' %}{{ m.content }}{{ eos_token }}"
    "{%- elif m.role == 'tool' %}"
    "[TOOL_RESULTS]{{ '{\"content\": ' ~ (m.content | tojson) ~ ', \"call_id\": \"' ~ m.tool_call_id ~ '\"}' }}"
    "[/TOOL_RESULTS]"
    "{%- else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# Gemma 3: the system prompt joins the first user turn; roles must alternate (no tool turns).
GEMMA3 = (
    "{{ bos_token }}{% if messages[0].role == 'system' %}{% set first = messages[0].content ~ '\\n\\n' %}"
    "{% set msgs = messages[1:] %}{% else %}{% set first = '' %}{% set msgs = messages %}{% endif %}"
    "{%- for m in msgs %}"
    "{%- if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n{{ first if loop.first else '' }}"
    "{{ m.content | trim }}<end_of_turn>\n{% endfor %}"
    "{%- if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# Gemma 2: as Gemma 3, but a system turn is refused by the template itself.
GEMMA2 = "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}" + GEMMA3

# Phi-3.5: <|end|> ends a turn; a rendering without the generation prompt ends with the EOS token.
PHI35 = (
    "{% for m in messages %}{% if m.role == 'system' and m.content %}<|system|>\n{{ m.content }}<|end|>\n"
    "{% elif m.role == 'user' %}<|user|>\n{{ m.content }}<|end|>\n"
    "{% elif m.role == 'assistant' %}<|assistant|>\n{{ m.content }}<|end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}"
)

# Hermes 3: two templates, a plain ChatML one and `tool_use` (tools in the system turn, calls as JSON inside
# <tool_call> lines, consecutive results in one tool turn).
_HERMES_TURNS = (
    "{%- for m in messages %}"
    "{%- if m.role in ('user', 'system') or (m.role == 'assistant' and not m.tool_calls) %}"
    "{%- if not (m.role == 'system' and tools) %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>" + NL +
    "{%- endif %}"
    "{%- elif m.role == 'assistant' %}<|im_start|>assistant"
    "{%- for c in m.tool_calls %}{{ '\\n<tool_call>\\n{\"name\": \"' ~ c.function.name ~ '\", \"arguments\": ' }}"
    "{{ c.function.arguments | tojson }}{{ '}\\n</tool_call>' }}{% endfor %}<|im_end|>" + NL +
    "{%- elif m.role == 'tool' %}"
    "{%- if loop.previtem and loop.previtem.role != 'tool' %}<|im_start|>tool" + NL + "{% endif %}"
    "<tool_response>\n{{ m.content }}\n</tool_response>" + NL +
    "{%- if loop.last or loop.nextitem.role != 'tool' %}<|im_end|>" + NL + "{% endif %}"
    "{%- endif %}{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant" + NL + "{% endif %}"
)
HERMES = {
    "default": _HERMES_TURNS,
    "tool_use": (
        "<|im_start|>system\nYou are a function calling AI model. Function signatures:\n<tools>"
        "{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>\n"
        "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n{% endif %}"
        "Answer each call as <tool_call>{...}</tool_call>.<|im_end|>" + NL + _HERMES_TURNS),
}

# GLM-4.5: no end-of-turn token (the next turn's header ends a turn: the model writes <|user|> or
# <|observation|>); reasoning kept only after the last user turn; arguments as <arg_key>/<arg_value> tags.
GLM45 = (
    "[gMASK]<sop>{% if tools %}<|system|>\n# Tools{% for t in tools %}\n{{ t | tojson }}{% endfor %}{% endif %}"
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' %}<|system|>\n{{ m.content }}"
    "{%- elif m.role == 'user' %}<|user|>\n{{ m.content }}"
    "{%- elif m.role == 'assistant' %}<|assistant|>"
    "{%- if loop.index0 > ns.last_user %}{{ '\\n<think>' ~ (m.reasoning_content or '') | trim ~ '</think>' }}{% endif %}"
    "{{ '\\n' ~ m.content | trim }}"
    "{%- for c in m.tool_calls or [] %}{{ '\\n<tool_call>' ~ c.function.name }}"
    "{%- for k, v in c.function.arguments.items() %}{{ '\\n<arg_key>' ~ k ~ '</arg_key>\\n<arg_value>' }}"
    "{{ v if v is string else v | tojson }}</arg_value>{% endfor %}{{ '\\n</tool_call>' }}{% endfor %}"
    "{%- elif m.role == 'tool' %}<|observation|>\n<tool_response>\n{{ m.content }}\n</tool_response>"
    "{%- endif %}{% endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>"
    "{%- if enable_thinking is defined and not enable_thinking %}{{ '\\n<think></think>' }}{% endif %}{% endif %}"
)

FAMILIES = {"qwen3": QWEN3, "deepseek_r1": R1, "llama3.1": LLAMA31, "mistral": MISTRAL, "gemma3": GEMMA3,
            "phi3.5": PHI35, "hermes3": HERMES, "glm4.5": GLM45}
SPECIAL_TOKENS = [
    "<|im_start|>", "<|im_end|>", "<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "[INST]", "[/INST]", "[TOOL_CALLS]",
    "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "<start_of_turn>",
    "<end_of_turn>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|observation|>", "[gMASK]", "<sop>",
    "<think>", "</think>", "<tool_call>", "</tool_call>",
]
