"""The assistant's chat format: ChatML turns, Hermes-style tool calls, and the reward readout.

One definition serves three readers, so they can never drift apart:
- the Jinja ``CHAT_TEMPLATE`` stored in every checkpoint's tokenizer config (what
  ``transformers`` and vLLM's chat endpoint render),
- :func:`render_segments`, the same rendering in Python with the assistant spans marked
  (what SFT uses to put the loss only on assistant tokens, end-of-turn included),
- the special tokens the tokenizer is trained with.

A test renders many conversations both ways and checks they are byte-identical.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "BOS",
    "CHAT_TEMPLATE",
    "END_OF_TEXT",
    "IM_END",
    "IM_START",
    "PAD",
    "REWARD",
    "SPECIAL_TOKENS",
    "TOOL_CALL_END",
    "TOOL_CALL_START",
    "TOOL_RESPONSE_END",
    "TOOL_RESPONSE_START",
    "parse_tool_calls",
    "render",
    "render_segments",
    "tool_call_text",
]

END_OF_TEXT = "<|endoftext|>"  # separates pretraining documents
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # end of a turn: the token generation stops on
PAD = "<|pad|>"
BOS = END_OF_TEXT
TOOL_CALL_START = "<tool_call>"  # vLLM's hermes parser looks these two up in the vocabulary
TOOL_CALL_END = "</tool_call>"
TOOL_RESPONSE_START = "<tool_response>"
TOOL_RESPONSE_END = "</tool_response>"
REWARD = "<|reward|>"  # the reward model reads its scalar at this appended token

SPECIAL_TOKENS: tuple[str, ...] = (
    END_OF_TEXT,
    PAD,
    IM_START,
    IM_END,
    TOOL_CALL_START,
    TOOL_CALL_END,
    TOOL_RESPONSE_START,
    TOOL_RESPONSE_END,
    REWARD,
)

TOOLS_PREAMBLE = (
    "You may call tools. For each call write <tool_call>{\"name\": ..., \"arguments\": ...}"
    "</tool_call>.\n<tools>\n"
)

# Kept deliberately small: every branch here has a twin in render_segments below.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '" + TOOLS_PREAMBLE.replace("\n", "\\n").replace('"', '\\"') + "' }}"
    "{%- for tool in tools %}{{- (tool.function if tool.function is defined else tool) | tojson }}{{- '\\n' }}{%- endfor %}"
    "{{- '</tools><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if message.content %}{{- message.content }}{%- endif %}"
    "{%- if message.tool_calls %}{%- for tc in message.tool_calls %}"
    "{%- set f = tc.function if tc.function is defined else tc %}"
    "{{- '<tool_call>\\n{\"name\": \"' + f.name + '\", \"arguments\": ' }}"
    "{%- if f.arguments is string %}{{- f.arguments }}{%- else %}{{- f.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>tool\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _dumps(obj: Any) -> str:
    # Matches transformers' Jinja `tojson` (json.dumps with ensure_ascii=False, no sorting).
    return json.dumps(obj, ensure_ascii=False)


def tool_call_text(name: str, arguments: Mapping[str, Any] | str) -> str:
    """The text of one Hermes tool call as the assistant writes it."""
    args = arguments if isinstance(arguments, str) else _dumps(dict(arguments))
    return f'{TOOL_CALL_START}\n{{"name": "{name}", "arguments": {args}}}\n{TOOL_CALL_END}'


def _message_text(message: Mapping[str, Any]) -> tuple[str, str, str]:
    """(prefix, body, suffix) of one non-leading-system message; body is what the role wrote."""
    role = message["role"]
    content = message.get("content") or ""
    if role == "assistant":
        body = content
        for tc in message.get("tool_calls") or []:
            f = tc.get("function", tc)
            body += tool_call_text(f["name"], f["arguments"])
        return f"{IM_START}assistant\n", body + IM_END, "\n"
    if role == "tool":
        return (
            f"{IM_START}tool\n",
            f"{TOOL_RESPONSE_START}\n{content}\n{TOOL_RESPONSE_END}{IM_END}",
            "\n",
        )
    return f"{IM_START}{role}\n", content + IM_END, "\n"


def render_segments(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = False,
) -> list[tuple[str, bool]]:
    """Render a conversation as (text, is_assistant_output) pieces.

    The assistant pieces are exactly what the model must learn to produce: the content,
    any tool calls and the closing ``<|im_end|>`` (without it the model never stops). An
    assistant message with ``"train": False`` is rendered the same but not marked.
    Joined, the pieces equal ``tokenizer.apply_chat_template(..., tokenize=False)``.
    """
    if not messages:
        raise ValueError("a conversation needs at least one message")
    out: list[tuple[str, bool]] = []
    has_system = messages[0]["role"] == "system"
    if tools:
        text = f"{IM_START}system\n"
        if has_system:
            text += (messages[0].get("content") or "") + "\n\n"
        text += TOOLS_PREAMBLE
        for tool in tools:
            text += _dumps(tool.get("function", tool)) + "\n"
        out.append((text + f"</tools>{IM_END}\n", False))
    elif has_system:
        out.append((f"{IM_START}system\n{messages[0].get('content') or ''}{IM_END}\n", False))
    for i, message in enumerate(messages):
        if i == 0 and has_system:
            continue
        prefix, body, suffix = _message_text(message)
        if message["role"] == "assistant":
            # A turn marked ``"train": False`` is context only (a deliberately flawed attempt).
            out += [(prefix, False), (body, bool(message.get("train", True))), (suffix, False)]
        else:
            out.append((prefix + body + suffix, False))
    if add_generation_prompt:
        out.append((f"{IM_START}assistant\n", False))
    return out


def render(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = False,
) -> str:
    """The conversation as one string, identical to the checkpoint's chat template."""
    return "".join(t for t, _ in render_segments(messages, tools, add_generation_prompt))


_TOOL_CALL = re.compile(re.escape(TOOL_CALL_START) + r"\s*(.*?)\s*" + re.escape(TOOL_CALL_END), re.DOTALL)


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Split generated text into (content, Hermes tool calls as {"name", "arguments"}).

    A call whose JSON does not parse, or lacks a name, stays in the content: the caller
    sees what the model wrote instead of losing it.
    """
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    last = 0
    for m in _TOOL_CALL.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            continue
        args = obj.get("arguments", {})
        calls.append({"name": obj["name"], "arguments": args if isinstance(args, str) else json.dumps(args)})
        kept.append(text[last:m.start()])
        last = m.end()
    kept.append(text[last:])
    return "".join(kept).strip() if calls else text, calls
