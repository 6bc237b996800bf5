"""SFT loss masks on the real chat templates of five model families.

Each template below is the exact ``chat_template`` string of the model's tokenizer_config.json
(Jinja, split into literals only for line length). The tokenizer is raylm's byte-level BPE plus
the family's special tokens, so the test needs no download; the rendering, the end-of-turn token
and the label spans are the family's own. The loss must cover exactly each assistant content and
its end-of-turn token: not the role header or generation prompt before it, not the newline
ChatML/Qwen and Gemma write after ``<|im_end|>``/``<end_of_turn>``, not the eos Phi-3 appends.
"""

from __future__ import annotations

import numpy as np
import pytest

from data_pipelines.formats import RecordProblem
from data_pipelines.pack import IGNORE_INDEX
from data_pipelines.tokenize import (
    TokenizeBatch,
    encode_conversation,
    fit_to_template,
    template_traits,
)
from data_pipelines.tokenizer_train import build_tokenizer

# The templates, verbatim (source: openvinotoolkit/openvino.genai tests/python_tests/data/tokenizer_configs.py,
# which holds the models' tokenizer_config.json values).
# meta-llama/Llama-3.1-8B-Instruct, tokenizer_config.json
LLAMA_3_1 = (
    "{{- bos_token }}\n"
    "{%- if custom_tools is defined %}\n"
    "    {%- set tools = custom_tools %}\n"
    "{%- endif %}\n"
    "{%- if not tools_in_user_message is defined %}\n"
    "    {%- set tools_in_user_message = true %}\n"
    "{%- endif %}\n"
    "{%- if not date_string is defined %}\n"
    '    {%- set date_string = "26 Jul 2024" %}\n'
    "{%- endif %}\n"
    "{%- if not tools is defined %}\n"
    "    {%- set tools = none %}\n"
    "{%- endif %}\n"
    "\n"
    "{#- This block extracts the system message, so we can slot it into the right place. #}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    '    {%- set system_message = "" %}\n'
    "{%- endif %}\n"
    "\n"
    "{#- System message + builtin tools #}\n"
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}\n'
    "{%- if builtin_tools is defined or tools is not none %}\n"
    '    {{- "Environment: ipython\\n" }}\n'
    "{%- endif %}\n"
    "{%- if builtin_tools is defined %}\n"
    "    "
    '{{- "Tools: " + builtin_tools | reject(\'equalto\', \'code_interpreter\') | join(", ") + "\\n\\n"}}\n'
    "{%- endif %}\n"
    '{{- "Cutting Knowledge Date: December 2023\\n" }}\n'
    '{{- "Today Date: " + date_string + "\\n\\n" }}\n'
    "{%- if tools is not none and not tools_in_user_message %}\n"
    "    "
    '{{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}\n'
    "    "
    '{{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\' }}\n'
    '    {{- "Do not use variables.\\n\\n" }}\n'
    "    {%- for t in tools %}\n"
    "        {{- t | tojson(indent=4) }}\n"
    '        {{- "\\n\\n" }}\n'
    "    {%- endfor %}\n"
    "{%- endif %}\n"
    "{{- system_message }}\n"
    '{{- "<|eot_id|>" }}\n'
    "\n"
    "{#- Custom tools are passed in a user message with some extra guidance #}\n"
    "{%- if tools_in_user_message and not tools is none %}\n"
    "    {#- Extract the first user message so we can plug it in here #}\n"
    "    {%- if messages | length != 0 %}\n"
    "        {%- set first_user_message = messages[0]['content']|trim %}\n"
    "        {%- set messages = messages[1:] %}\n"
    "    {%- else %}\n"
    "        "
    '{{- raise_exception("Cannot put tools in the first user message when there\'s no first user message!") }}\n'
    "{%- endif %}\n"
    "    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
    "    "
    '{{- "Given the following functions, please respond with a JSON for a function call " }}\n'
    '    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}\n'
    "    "
    '{{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.\' }}\n'
    '    {{- "Do not use variables.\\n\\n" }}\n'
    "    {%- for t in tools %}\n"
    "        {{- t | tojson(indent=4) }}\n"
    '        {{- "\\n\\n" }}\n'
    "    {%- endfor %}\n"
    '    {{- first_user_message + "<|eot_id|>"}}\n'
    "{%- endif %}\n"
    "\n"
    "{%- for message in messages %}\n"
    "    "
    "{%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
    "        "
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n"
    "    {%- elif 'tool_calls' in message %}\n"
    "        {%- if not message.tool_calls|length == 1 %}\n"
    "            "
    '{{- raise_exception("This model only supports single tool-calls at once!") }}\n'
    "        {%- endif %}\n"
    "        {%- set tool_call = message.tool_calls[0].function %}\n"
    "        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}\n"
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    '            {{- "<|python_tag|>" + tool_call.name + ".call(" }}\n'
    "            {%- for arg_name, arg_val in tool_call.arguments | items %}\n"
    "                {{- arg_name + '=\"' + arg_val + '\"' }}\n"
    "                {%- if not loop.last %}\n"
    '                    {{- ", " }}\n'
    "                {%- endif %}\n"
    "                {%- endfor %}\n"
    '            {{- ")" }}\n'
    "        {%- else  %}\n"
    "            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "            {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n"
    "            {{- '\"parameters\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    '            {{- "}" }}\n'
    "        {%- endif %}\n"
    "        {%- if builtin_tools is defined %}\n"
    "            {#- This means we're in ipython mode #}\n"
    '            {{- "<|eom_id|>" }}\n'
    "        {%- else %}\n"
    '            {{- "<|eot_id|>" }}\n'
    "        {%- endif %}\n"
    '    {%- elif message.role == "tool" or message.role == "ipython" %}\n'
    '        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}\n'
    "        {%- if message.content is mapping or message.content is iterable %}\n"
    "            {{- message.content | tojson }}\n"
    "        {%- else %}\n"
    "            {{- message.content }}\n"
    "        {%- endif %}\n"
    '        {{- "<|eot_id|>" }}\n'
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

# Qwen/Qwen2.5-3B-Instruct (the Qwen2.5 instruct models share it), tokenizer_config.json
QWEN_2_5 = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    "
    '{{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    "
    '{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        "
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    "
    '{%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}\n'
    "        "
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    "            {{- tool_call.name }}\n"
    '            {{- \'", "arguments": \' }}\n'
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# google/gemma-2-9b-it (the same string as google/gemma-2b-it's), tokenizer_config.json
GEMMA_2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n"
    "' + message['content'] | trim + '<end_of_turn>\n"
    "' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n"
    "'}}{% endif %}"
)

# microsoft/Phi-3-mini-4k-instruct, tokenizer_config.json
PHI_3_MINI = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n"
    "' + message['content'] + '<|end|>\n"
    "'}}{% elif message['role'] == 'user' %}{{'<|user|>\n"
    "' + message['content'] + '<|end|>\n"
    "'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n"
    "' + message['content'] + '<|end|>\n"
    "'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n"
    "' }}{% else %}{{ eos_token }}{% endif %}"
)

# mistralai/Mistral-7B-Instruct-v0.3, tokenizer_config.json
MISTRAL_V0_3 = (
    '{%- if messages[0]["role"] == "system" %}\n'
    '    {%- set system_message = messages[0]["content"] %}\n'
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "{%- if not tools is defined %}\n"
    "    {%- set tools = none %}\n"
    "{%- endif %}\n"
    '{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}\n'
    "\n"
    "{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}\n"
    "{%- set ns = namespace() %}\n"
    "{%- set ns.index = 0 %}\n"
    "{%- for message in loop_messages %}\n"
    "    "
    '{%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}\n'
    '        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}\n'
    "            "
    '{{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "        {%- endif %}\n"
    "        {%- set ns.index = ns.index + 1 %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    '    {%- if message["role"] == "user" %}\n'
    "        {%- if tools is not none and (message == user_messages[-1]) %}\n"
    '            {{- "[AVAILABLE_TOOLS] [" }}\n'
    "            {%- for tool in tools %}\n"
    "                {%- set tool = tool.function %}\n"
    '                {{- \'{"type": "function", "function": {\' }}\n'
    '                {%- for key, val in tool.items() if key != "return" %}\n'
    "                    {%- if val is string %}\n"
    "                        {{- '\"' + key + '\": \"' + val + '\"' }}\n"
    "                    {%- else %}\n"
    "                        {{- '\"' + key + '\": ' + val|tojson }}\n"
    "                    {%- endif %}\n"
    "                    {%- if not loop.last %}\n"
    '                        {{- ", " }}\n'
    "                    {%- endif %}\n"
    "                {%- endfor %}\n"
    '                {{- "}}" }}\n'
    "                {%- if not loop.last %}\n"
    '                    {{- ", " }}\n'
    "                {%- else %}\n"
    '                    {{- "]" }}\n'
    "                {%- endif %}\n"
    "            {%- endfor %}\n"
    '            {{- "[/AVAILABLE_TOOLS]" }}\n'
    "            {%- endif %}\n"
    "        {%- if loop.last and system_message is defined %}\n"
    '            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}\n'
    "        {%- else %}\n"
    '            {{- "[INST] " + message["content"] + "[/INST]" }}\n'
    "        {%- endif %}\n"
    "    {%- elif message.tool_calls is defined and message.tool_calls is not none %}\n"
    '        {{- "[TOOL_CALLS] [" }}\n'
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- set out = tool_call.function|tojson %}\n"
    "            {{- out[:-1] }}\n"
    "            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}\n"
    "                "
    '{{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}\n'
    "            {%- endif %}\n"
    "            {{- ', \"id\": \"' + tool_call.id + '\"}' }}\n"
    "            {%- if not loop.last %}\n"
    '                {{- ", " }}\n'
    "            {%- else %}\n"
    '                {{- "]" + eos_token }}\n'
    "            {%- endif %}\n"
    "        {%- endfor %}\n"
    '    {%- elif message["role"] == "assistant" %}\n'
    '        {{- " " + message["content"]|trim + eos_token}}\n'
    '    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}\n'
    "        {%- if message.content is defined and message.content.content is defined %}\n"
    "            {%- set content = message.content.content %}\n"
    "        {%- else %}\n"
    "            {%- set content = message.content %}\n"
    "        {%- endif %}\n"
    '        {{- \'[TOOL_RESULTS] {"content": \' + content|string + ", " }}\n'
    "        "
    "{%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}\n"
    "            "
    '{{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}\n'
    "        {%- endif %}\n"
    "        {{- '\"call_id\": \"' + message.tool_call_id + '\"}[/TOOL_RESULTS]' }}\n"
    "    {%- else %}\n"
    "        "
    '{{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}\n'
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)

CORPUS = [
    "The small dog runs to the town. Anna lives in Brookfield and works as a baker.",
    "Review: a great movie with a happy ending. Is this review positive or negative?",
] * 50

# family: (template, special tokens, end-of-turn token, renders a system turn, renders a tool turn)
FAMILIES = {
    "llama3.1": (LLAMA_3_1, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                             "extra": ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
                                       "<|python_tag|>"]}, "<|eot_id|>", True, True),
    "qwen2.5": (QWEN_2_5, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                           "extra": ["<|im_start|>"]}, "<|im_end|>", True, True),
    "gemma2": (GEMMA_2, {"bos_token": "<bos>", "eos_token": "<eos>",
                         "extra": ["<start_of_turn>", "<end_of_turn>"]}, "<end_of_turn>", False,
               False),
    "phi3": (PHI_3_MINI, {"bos_token": "<s>", "eos_token": "<|endoftext|>", "extra": []},
             "<|end|>", True, False),
    "mistral0.3": (MISTRAL_V0_3, {"bos_token": "<s>", "eos_token": "</s>",
                                  "extra": ["[INST]", "[/INST]"]}, "</s>", False, False),
}  # fmt: skip

SYSTEM = {"role": "system", "content": "Be brief."}
DIALOGUE = [
    {"role": "user", "content": "Review: a great movie. Is this review positive or negative?"},
    {"role": "assistant", "content": "positive"},
    {"role": "user", "content": "And the town where Anna lives?"},
    {"role": "assistant", "content": "Anna lives in Brookfield."},
]


@pytest.fixture(scope="module")
def base():
    return build_tokenizer(iter(CORPUS), vocab_size=400, min_frequency=1, max_length=512)


def family_tokenizer(base, family: str):
    """raylm's BPE with the family's special tokens and its real chat template."""
    import copy

    template, specials, *_ = FAMILIES[family]
    tok = copy.deepcopy(base)
    named = {k: v for k, v in specials.items() if k != "extra"}
    tok.add_special_tokens({**named, "extra_special_tokens": specials["extra"]},
                           replace_extra_special_tokens=False)  # fmt: skip
    tok.chat_template = template
    return tok


def labelled_spans(ids: np.ndarray, labels: np.ndarray, tok) -> list[str]:
    """The decoded runs of consecutive tokens that carry loss."""
    carries = labels != IGNORE_INDEX
    edges = np.flatnonzero(np.diff(np.concatenate([[0], carries.astype(int), [0]])))
    return [tok.decode(ids[a:b]) for a, b in zip(edges[::2], edges[1::2], strict=True)]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_loss_covers_each_answer_and_its_end_of_turn_token_only(base, family):
    _, _, eot, system, tool = FAMILIES[family]
    tok = family_tokenizer(base, family)
    traits = template_traits(tok)
    assert (traits.end_of_turn, traits.system, traits.tool) == (eot, system, tool)
    messages = [SYSTEM, *DIALOGUE] if system else DIALOGUE
    ids, labels = encode_conversation(tok, messages, traits.end_of_turn)
    np.testing.assert_array_equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])
    answers = [m["content"] for m in DIALOGUE if m["role"] == "assistant"]
    # Mistral writes "[/INST] " + answer: BPE joins that space to the answer's first word, and
    # that token is the first one the model must predict, so it carries loss with its space.
    lead = " " if family == "mistral0.3" else ""
    assert labelled_spans(ids, labels, tok) == [f"{lead}{a}{eot}" for a in answers]
    # The end-of-turn tokens of the assistant turns are learned; those closing other turns are not.
    eot_id = tok.convert_tokens_to_ids(eot)
    learned = labels[ids == eot_id] != IGNORE_INDEX
    assert learned.sum() == len(answers) and len(learned) == len(answers) + (
        0 if lead else 2 + system
    )
    # The prompt a reply is generated from carries no loss, whatever the template adds to it.
    prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert (labels[:n_prompt] != IGNORE_INDEX).sum() == len(tok(lead + answers[0])["input_ids"]) + 1


def test_last_only_labels_the_final_answer(base):
    tok = family_tokenizer(base, "qwen2.5")
    ids, labels = encode_conversation(tok, DIALOGUE, "<|im_end|>", last_only=True)
    assert labelled_spans(ids, labels, tok) == ["Anna lives in Brookfield.<|im_end|>"]


@pytest.mark.parametrize("family", ["gemma2", "mistral0.3"])
def test_system_message_without_a_system_role_is_rejected_or_prepended(base, family):
    tok = family_tokenizer(base, family)
    traits = template_traits(tok)
    with pytest.raises(RecordProblem, match="no system role") as err:
        fit_to_template([SYSTEM, *DIALOGUE], traits)
    assert err.value.reason == "system_not_supported"
    fitted = fit_to_template([SYSTEM, *DIALOGUE], traits, system_fallback="prepend")
    assert fitted[0] == {"role": "user", "content": f"Be brief.\n\n{DIALOGUE[0]['content']}"}
    assert fitted[1:] == DIALOGUE[1:]
    ids, labels = encode_conversation(tok, fitted, traits.end_of_turn)
    assert "Be brief." in tok.decode(ids)
    assert len(labelled_spans(ids, labels, tok)) == 2


def test_tool_turn_on_a_template_without_tool_role_is_rejected(base):
    traits = template_traits(family_tokenizer(base, "phi3"))  # Phi-3 drops a tool turn silently
    with pytest.raises(RecordProblem, match="turn 2 is a tool turn") as err:
        fit_to_template([*DIALOGUE[:2], {"role": "tool", "content": "42"}, *DIALOGUE[2:]], traits)
    assert err.value.reason == "tool_not_supported"


def test_a_template_without_end_of_turn_token_is_refused_before_any_work(base):
    from data_pipelines.errors import DataError
    from data_pipelines.tokenize import check_tokenizer

    tok = family_tokenizer(base, "qwen2.5")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(DataError, match="closes an assistant turn with no special token"):
        check_tokenizer(tok, "sft", "plain-template")
    check_tokenizer(tok, "pretrain", "plain-template")  # pretraining needs no template


def _batch(texts: list[str]) -> dict[str, np.ndarray]:
    n = len(texts)
    return {"source": np.asarray([f"f.jsonl:{i + 1}" for i in range(n)], dtype=object),
            "reason": np.full(n, "", dtype=object), "detail": np.full(n, "", dtype=object),
            "text": np.asarray(texts, dtype=object)}  # fmt: skip


def test_tokenize_batch_counts_template_rejections_per_record(base, tmp_path):
    import json

    family_tokenizer(base, "gemma2").save_pretrained(tmp_path)
    step = TokenizeBatch(str(tmp_path), "sft", seq_len=256)
    alternating = [DIALOGUE[0], DIALOGUE[0], DIALOGUE[1]]  # Gemma raises on two user turns in a row
    out = step(_batch([json.dumps(m) for m in ([SYSTEM, *DIALOGUE], DIALOGUE, alternating)]))
    assert list(out["reason"]) == ["system_not_supported", "", "chat_template_error"]
    assert "Conversation roles must alternate" in out["detail"][2]
    assert out["n_tokens"][1] == len(out["input_ids"][1]) > 0


def test_tokenize_batch_preference_pairs(base, tmp_path):
    import json

    tok = family_tokenizer(base, "llama3.1")
    tok.save_pretrained(tmp_path)
    pair = {"prompt": DIALOGUE[:3], "chosen": "Anna lives in Brookfield.", "rejected": "The town."}
    out = TokenizeBatch(str(tmp_path), "preference", seq_len=256)(_batch([json.dumps(pair)]))
    assert out["reason"][0] == ""
    for side in ("", "rejected_"):
        ids, labels = out[f"{side}input_ids"][0], out[f"{side}labels"][0]
        answer = pair["rejected" if side else "chosen"]
        assert labelled_spans(ids, labels, tok) == [f"{answer}<|eot_id|>"]
    assert out["n_tokens"][0] == len(out["input_ids"][0]) + len(out["rejected_input_ids"][0])
    short = TokenizeBatch(str(tmp_path), "preference", seq_len=40)(_batch([json.dumps(pair)]))
    assert short["reason"][0] == "too_long"
