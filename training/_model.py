"""Model construction and the on-disk stage folder every stage writes.

A stage folder is a complete Hugging Face checkpoint: ``config.json``, safetensors weights,
``tokenizer.json`` with the chat template, and ``generation_config.json`` whose stop tokens
are the end of a turn and the end of a document. ``transformers`` and vLLM load it as is.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from assist.chat_format import END_OF_TEXT, IM_END, render, render_segments
from training.config import ModelConfig

__all__ = [
    "encode_chat",
    "encode_prompt",
    "llama_config",
    "n_params",
    "pad_right",
    "save_stage",
    "stop_ids",
    "token_logprobs",
]

IGNORE = -100


def llama_config(cfg: ModelConfig, tok: PreTrainedTokenizerFast) -> LlamaConfig:
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError("model.hidden_size must be a multiple of model.num_heads")
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tok.convert_tokens_to_ids(END_OF_TEXT),
        eos_token_id=stop_ids(tok),
        pad_token_id=tok.pad_token_id,
        torch_dtype="float32",
    )


def new_model(cfg: ModelConfig, tok: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(cfg, tok))


def stop_ids(tok: PreTrainedTokenizerFast) -> list[int]:
    return [tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(END_OF_TEXT)]


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_stage(model: Any, tok: PreTrainedTokenizerFast, path: Path, card: dict[str, Any] | None = None) -> None:
    """Write a self-contained HF folder atomically (a half-written stage never looks done)."""
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    stops = stop_ids(tok)
    GenerationConfig(
        bos_token_id=stops[1], eos_token_id=stops, pad_token_id=tok.pad_token_id,
        do_sample=False, max_new_tokens=256,
    ).save_pretrained(tmp)
    if card:
        (tmp / "assist_stage.json").write_text(json.dumps(card, indent=2))
    shutil.rmtree(path, ignore_errors=True)
    tmp.replace(path)


def encode_prompt(tok: PreTrainedTokenizerFast, messages: Sequence[dict], tools: Sequence[dict] | None = None) -> list[int]:
    """Token ids of a conversation ready for the assistant's next turn."""
    return tok.encode(render(messages, tools, add_generation_prompt=True), add_special_tokens=False)


def encode_chat(
    tok: PreTrainedTokenizerFast, messages: Sequence[dict], tools: Sequence[dict] | None, max_len: int,
) -> tuple[list[int], list[int]]:
    """(input ids, labels) with labels only on what the assistant wrote, ``<|im_end|>`` included.

    The whole conversation is tokenized at once and each token is labelled by where it
    starts, so the ids are exactly those the chat template gives at inference time.
    """
    spans, text = [], ""
    for piece, is_assistant in render_segments(messages, tools):
        if is_assistant:
            spans.append((len(text), len(text) + len(piece)))
        text += piece
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    ids: list[int] = enc["input_ids"]
    labels = []
    for token_id, (start, _end) in zip(ids, enc["offset_mapping"], strict=True):
        inside = any(a <= start < b for a, b in spans)
        labels.append(token_id if inside else IGNORE)
    return ids[:max_len], labels[:max_len]


def pad_right(rows: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    return out


def token_logprobs(model: torch.nn.Module, rows: list[list[int]], pad_id: int) -> torch.Tensor:
    """log p of each row's token t given tokens < t (column 0 is zero), right-padded."""
    device = next(model.parameters()).device
    ids = pad_right(rows, pad_id).to(device)
    mask = pad_right([[1] * len(r) for r in rows], 0).to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    return torch.cat([torch.zeros_like(lp[:, :1]), lp], dim=1)
