"""The assistant's chat format: ChatML turns, Hermes-style tool calls, and the reward readout.

One definition serves three readers, so they can never drift apart:
- the Jinja ``CHAT_TEMPLATE`` stored in every checkpoint's tokenizer config (what
  ``transformers`` and vLLM's chat endpoint render),
- :func:`render_segments`, the same rendering in Python with the assistant spans marked
  (what SFT uses to put the loss only on assistant tokens, end-of-turn included),
- the special tokens the tokenizer is trained with.

A test renders many conversations both ways and checks they are byte-identical.

Only the template writes control tokens: :func:`render_parts` marks them, and
:class:`ChatEncoder` tokenizes everything else (messages, tool results, passages, tool
definitions) with special tokens split, so a user's ``<|im_end|>`` is text, not a turn.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch loads with the first reward read, not with `import assist`
    import torch

__all__ = [
    "BOS",
    "CHAT_TEMPLATE",
    "ChatEncoder",
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
    "chat_encoder",
    "content_text",
    "parse_tool_calls",
    "render",
    "render_parts",
    "render_segments",
    "reward_scores",
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
    "You may call tools. For each call write <tool_call>{\"arguments\": ..., \"name\": ...}"
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
    "{{- '<tool_call>\\n{\"arguments\": ' }}"
    "{%- if f.arguments is string %}{{- f.arguments }}{%- else %}{{- f.arguments | tojson }}{%- endif %}"
    "{{- ', \"name\": \"' + f.name + '\"}\\n</tool_call>' }}"
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


def content_text(content: Any) -> Any:
    """OpenAI content parts ``[{"type": "text", "text": ...}]`` as the plain text they hold."""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    return content


def tool_call_text(name: str, arguments: Mapping[str, Any] | str) -> str:
    """The text of one Hermes tool call as the assistant writes it."""
    args = arguments if isinstance(arguments, str) else _dumps(dict(arguments))
    return f'{TOOL_CALL_START}\n{{"arguments": {args}, "name": "{name}"}}\n{TOOL_CALL_END}'


# A conversation renders as parts: (text, is_control). A control part is one of the template's own
# special tokens; every other part is text, whoever wrote it. Encoders map a control part to its
# token id and tokenize text parts with special tokens split, so a user's "<|im_end|>" (or a tool
# result's "<tool_call>") stays the characters it is and never ends a turn or starts a call.
Part = tuple[str, bool]
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def _literal(text: str) -> list[Part]:
    """The template's own text: the special tokens in it are control tokens."""
    parts: list[Part] = []
    last = 0
    for m in _SPECIAL_RE.finditer(text):
        if m.start() > last:
            parts.append((text[last:m.start()], False))
        parts.append((m.group(), True))
        last = m.end()
    if last < len(text):
        parts.append((text[last:], False))
    return parts


def _text(text: str) -> list[Part]:
    """What a client, a tool or a retrieved passage wrote: text only."""
    return [(text, False)] if text else []


def _message_parts(message: Mapping[str, Any]) -> tuple[list[Part], list[Part], list[Part]]:
    """(prefix, body, suffix) of one non-leading-system message; body is what the role wrote."""
    role = message["role"]
    content = message.get("content") or ""
    if role == "assistant":
        body = _text(content)
        for tc in message.get("tool_calls") or []:
            f = tc.get("function", tc)
            call = tool_call_text(f["name"], f["arguments"])[len(TOOL_CALL_START):-len(TOOL_CALL_END)]
            body += [(TOOL_CALL_START, True), *_text(call), (TOOL_CALL_END, True)]
        return [(IM_START, True), ("assistant\n", False)], [*body, (IM_END, True)], [("\n", False)]
    if role == "tool":
        return ([(IM_START, True), ("tool\n", False)],
                [(TOOL_RESPONSE_START, True), *_text(f"\n{content}\n"), (TOOL_RESPONSE_END, True),
                 (IM_END, True)],
                [("\n", False)])
    return [(IM_START, True), *_text(f"{role}\n{content}")], [(IM_END, True)], [("\n", False)]


def render_parts(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = False,
) -> list[tuple[list[Part], bool]]:
    """The conversation as segments of parts, each segment with its ``is_assistant_output`` flag.

    Joined, the parts' texts equal :func:`render`; the control parts are exactly the special
    tokens the template itself writes.
    """
    if not messages:
        raise ValueError("a conversation needs at least one message")
    out: list[tuple[list[Part], bool]] = []
    has_system = messages[0]["role"] == "system"
    if tools:
        parts: list[Part] = [(IM_START, True), ("system\n", False)]
        if has_system:
            parts += _text((messages[0].get("content") or "") + "\n\n")
        parts += _literal(TOOLS_PREAMBLE)
        for tool in tools:
            parts += _text(_dumps(tool.get("function", tool)) + "\n")
        out.append(([*parts, ("</tools>", False), (IM_END, True), ("\n", False)], False))
    elif has_system:
        out.append(([(IM_START, True), *_text(f"system\n{messages[0].get('content') or ''}"), (IM_END, True),
                     ("\n", False)], False))
    for i, message in enumerate(messages):
        if i == 0 and has_system:
            continue
        prefix, body, suffix = _message_parts(message)
        if message["role"] == "assistant":
            # A turn marked ``"train": False`` is context only (a deliberately flawed attempt).
            out += [(prefix, False), (body, bool(message.get("train", True))), (suffix, False)]
        else:
            out.append((prefix + body + suffix, False))
    if add_generation_prompt:
        out.append(([(IM_START, True), ("assistant\n", False)], False))
    return out


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
    return [("".join(t for t, _ in parts), flag)
            for parts, flag in render_parts(messages, tools, add_generation_prompt)]


def render(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    add_generation_prompt: bool = False,
) -> str:
    """The conversation as one string, identical to the checkpoint's chat template."""
    return "".join(t for t, _ in render_segments(messages, tools, add_generation_prompt))


class ChatEncoder:
    """Token ids of chat prompts in which only the template writes control tokens.

    Text parts are tokenized by a copy of the tokenizer that matches no added token (each one
    marked special, ``encode_special_tokens`` on), so a ``<|im_end|>`` in a message comes out
    as the pieces ``<``, ``|``, ``im``, ... Special tokens are hard boundaries for the
    tokenizer anyway, so for text holding none the ids equal those of tokenizing the rendered
    string at once, as training does. A checkpoint with another chat template is rendered by
    that template with each message's content held out behind an unguessable placeholder, then
    encoded the same way (the template's own special tokens are control tokens, the contents
    text). Safe to share between threads: nothing is mutated after construction.
    """

    def __init__(self, tokenizer: Any) -> None:
        from tokenizers import Tokenizer

        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        for token in spec.get("added_tokens") or []:
            token["special"] = True
        spec["truncation"] = spec["padding"] = None
        self._plain = Tokenizer.from_str(json.dumps(spec))
        self._plain.encode_special_tokens = True
        self.tokenizer = tokenizer
        self.controls: dict[str, int] = {str(t): int(i) for i, t in tokenizer.added_tokens_decoder.items()}
        by_length = sorted(self.controls, key=len, reverse=True)
        self._control_re = re.compile("|".join(map(re.escape, by_length))) if by_length else None
        self.template = tokenizer.chat_template
        self.ours = self.template == CHAT_TEMPLATE

    def text_ids(self, text: str) -> list[int]:
        """Ids of plain text: every special token in it split into ordinary pieces."""
        return list(self._plain.encode(text, add_special_tokens=False).ids) if text else []

    def encode_parts(self, parts: Sequence[Part]) -> list[int]:
        """Control parts as their ids; each run of text parts tokenized as one plain text."""
        ids: list[int] = []
        run: list[str] = []
        for text, control in parts:
            if not control:
                run.append(text)
                continue
            ids += self.text_ids("".join(run))
            run = []
            ids.append(self.controls[text])
        return ids + self.text_ids("".join(run))

    def template_parts(self, text: str) -> list[Part]:
        """Text a chat template wrote: its added tokens are control tokens."""
        if self._control_re is None:
            return _text(text)
        parts: list[Part] = []
        last = 0
        for m in self._control_re.finditer(text):
            parts += _text(text[last:m.start()])
            parts.append((m.group(), True))
            last = m.end()
        return parts + _text(text[last:])

    def parts(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
              add_generation_prompt: bool = True) -> list[Part]:
        if self.ours:
            return [p for seg, _ in render_parts(messages, tools, add_generation_prompt) for p in seg]
        nonce = secrets.token_hex(16)
        held: dict[str, str] = {}

        def hold(message: Mapping[str, Any]) -> dict[str, Any]:
            content = message.get("content")
            if not isinstance(content, str) or not content:
                return dict(message)
            key = f"assist{nonce}x{len(held)}y"
            held[key] = content
            return {**message, "content": key}

        rendered = self.tokenizer.apply_chat_template(
            [hold(m) for m in messages], tools=list(tools) if tools else None, tokenize=False,
            add_generation_prompt=add_generation_prompt)
        parts: list[Part] = []
        last = 0
        for m in re.finditer(f"assist{nonce}x[0-9]+y", rendered):
            parts += self.template_parts(rendered[last:m.start()]) + _text(held[m.group()])
            last = m.end()
        return parts + self.template_parts(rendered[last:])

    def encode(self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None,
               add_generation_prompt: bool = True) -> list[int]:
        """The prompt's ids, ready for the assistant's turn when ``add_generation_prompt``."""
        return self.encode_parts(self.parts(messages, tools, add_generation_prompt))


_ENCODERS: weakref.WeakKeyDictionary[Any, ChatEncoder] = weakref.WeakKeyDictionary()
_ENCODERS_LOCK = threading.Lock()


def chat_encoder(tokenizer: Any) -> ChatEncoder:
    """The (cached) :class:`ChatEncoder` of a Hugging Face fast tokenizer."""
    with _ENCODERS_LOCK:
        encoder = _ENCODERS.get(tokenizer)
        if encoder is None or encoder.template != tokenizer.chat_template:
            encoder = _ENCODERS[tokenizer] = ChatEncoder(tokenizer)
        return encoder


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


def reward_scores(rm: torch.nn.Module, tok: Any, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    """The reward model's reading of each prompt+completion id list (``<|reward|>`` appended when
    missing): the scalar at the readout token. Training and ``strategies.RewardModel`` both
    read rewards here."""
    import torch

    readout = tok.convert_tokens_to_ids(REWARD)
    rows = [list(s) if s and s[-1] == readout else [*s, readout] for s in sequences]
    device = next(rm.parameters()).device
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    # Right padding: the classifier reads the last non-pad token, our readout token.
    return rm(input_ids=ids, attention_mask=mask).logits[:, 0].float()
