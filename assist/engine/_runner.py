"""A lean forward pass over an HF Llama's own weights, with a preallocated KV cache.

The cache is ``[slots, kv_heads, max_len, head_dim]`` per layer (views of one tensor); a sequence
owns a slot for its life. Active sequences are kept in slots ``0..B-1`` (the scheduler
compacts them), so a decode step reads ``cache[:B, :, :L]`` as a view, with no gathering.
Prefill writes a prompt's keys and values into its slot once; ``n`` samples of one prompt
copy that slot instead of recomputing it, and a prompt whose prefix is in the prefix cache
(:mod:`assist.engine._prefix_cache`) gets that prefix copied in and prefills only the rest.

The arithmetic mirrors ``transformers``' Llama (RMSNorm in float32, rotary tables built
the same way, SiLU-gated MLP), so greedy decoding matches it token for token.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from assist.engine._compiled import CompiledDecode

__all__ = ["LlamaRunner"]

log = logging.getLogger(__name__)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _fuse(*linears: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stacked weights (and biases) of linears that read the same input."""
    weight = torch.cat([m.weight for m in linears], 0)
    biases = [m.bias for m in linears]
    bias = torch.cat(biases, 0) if all(b is not None for b in biases) else None
    return weight, bias


class LlamaRunner:
    def __init__(self, model: torch.nn.Module, slots: int, max_len: int, *, compile: bool = False) -> None:
        """``compile``: run decode steps through ``torch.compile`` (:mod:`assist.engine._compiled`),
        compiled here, before the first request; where compiling fails (no C++ compiler, say),
        decode runs eagerly and :attr:`compiled` is False."""
        cfg = model.config
        if getattr(cfg, "model_type", "") != "llama":
            raise ValueError(f"the torch engine runs Llama checkpoints, not {cfg.model_type!r}")
        rope = getattr(cfg, "rope_scaling", None) or {}
        if rope and rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError("the torch engine supports default RoPE only")
        self.model = model.eval()
        self.cfg = cfg
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        self.slots = slots
        self.max_len = min(max_len, cfg.max_position_embeddings)
        # One tensor for every layer's keys and values ([layers x 2, slots, ...]; layer i's keys
        # are plane 2i, its values 2i + 1), so copying a slot, or a prefix into or out of the
        # prefix cache, is one indexed copy rather than two per layer.
        layers = len(model.model.layers)
        self.cache = torch.zeros((2 * layers, slots, self.n_kv, self.max_len, self.head_dim),
                                 dtype=self.dtype, device=self.device)
        self.k = [self.cache[2 * i] for i in range(layers)]  # contiguous views: [slots, kv, L, D]
        self.v = [self.cache[2 * i + 1] for i in range(layers)]
        # Rotary tables, computed exactly as LlamaRotaryEmbedding does.
        inv_freq = model.model.rotary_emb.inv_freq.to(self.device, torch.float32)
        scale = getattr(model.model.rotary_emb, "attention_scaling", 1.0)
        positions = torch.arange(self.max_len, device=self.device, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * scale).to(self.dtype)
        self.sin = (emb.sin() * scale).to(self.dtype)
        # One matmul for q, k and v, and one for gate and up: half the kernel launches per
        # layer, which is what a decode step of a small model is made of.
        self.qkv = [_fuse(a.q_proj, a.k_proj, a.v_proj) for a in (x.self_attn for x in model.model.layers)]
        self.gate_up = [_fuse(x.mlp.gate_proj, x.mlp.up_proj) for x in model.model.layers]
        self.q_size = self.n_heads * self.head_dim
        self.kv_size = self.n_kv * self.head_dim
        self.ffn = model.model.layers[0].mlp.gate_proj.out_features
        self._decode: CompiledDecode | None = None
        if compile:
            try:
                self._decode = CompiledDecode(self)
                self._decode.warm_up()
            except Exception as exc:  # noqa: BLE001 - any failure means: decode eagerly
                log.warning("torch.compile failed (%s: %s); the engine decodes eagerly", type(exc).__name__, exc)
                self._decode = None

    @property
    def compiled(self) -> bool:
        """Whether decode steps run compiled."""
        return self._decode is not None

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # skip two no-op casts per call on the CPU path
            return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * h.to(x.dtype)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, slot_start: int, *,
                all_positions: bool = False, last: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for the last token of each row (``[B, V]``), or for every token (``[B, T, V]``).

        ``all_positions`` serves prompt logprobs: one prefill scores the whole prompt.
        ``last``: per row, the index of the token whose logits to return (right-padded rows).

        ``tokens``/``positions``: ``[B, T]``; row ``b`` lives in slot ``slot_start + b`` and
        its tokens sit at consecutive ``positions`` (prefill: 0..T-1, decode: one each).
        Keys and values are written to the cache; attention reads each row's own prefix.
        """
        if self._decode is not None and not all_positions and last is None and self._decode.applies(tokens, positions):
            return self._decode(tokens, positions, slot_start)
        bsz, t = tokens.shape
        m = self.model.model
        h = m.embed_tokens(tokens)
        cos = self.cos[positions][:, None]  # [B, 1, T, D]
        sin = self.sin[positions][:, None]
        rows = slice(slot_start, slot_start + bsz)
        end = int(positions.max()) + 1
        # Key j is visible to the query at position p when j <= p.
        keys = torch.arange(end, device=self.device)
        mask = keys[None, None, None, :] <= positions[:, None, :, None]  # [B, 1, T, end]
        decode = t == 1
        if decode:
            # One new token per row: plain batched matmuls beat the fused SDPA kernel on
            # q_len=1 (it is built for long queries), and an additive mask is reused by every layer.
            bias = torch.zeros(mask.shape, dtype=self.dtype, device=self.device).masked_fill_(~mask, float("-inf"))
            # Flat row index of (slot, kv head, position) in a cache viewed as [-1, head_dim]:
            # one index_copy_ per tensor writes every row's new key (cheaper than scatter).
            slots = torch.arange(slot_start, slot_start + bsz, device=self.device)
            heads = torch.arange(self.n_kv, device=self.device)
            flat = ((slots[:, None] * self.n_kv + heads[None, :]) * self.max_len + positions[:, :1]).reshape(-1)
            scale = self.head_dim ** -0.5
        for i, layer in enumerate(m.layers):
            attn = layer.self_attn
            x = self._norm(h, layer.input_layernorm.weight)
            w, b = self.qkv[i]
            qk, v = F.linear(x, w, b).split((self.q_size + self.kv_size, self.kv_size), -1)
            # Rotary embedding on queries and keys at once (they share positions).
            qk = qk.view(bsz, t, self.n_heads + self.n_kv, self.head_dim).transpose(1, 2)
            qk = qk * cos + _rotate_half(qk) * sin
            q, k = qk.split((self.n_heads, self.n_kv), 1)
            v = v.view(bsz, t, self.n_kv, self.head_dim).transpose(1, 2)
            if decode:
                self.k[i].view(-1, self.head_dim).index_copy_(0, flat, k.reshape(-1, self.head_dim))
                self.v[i].view(-1, self.head_dim).index_copy_(0, flat, v.reshape(-1, self.head_dim))
            else:
                index = positions[:, None, :, None].expand(bsz, self.n_kv, t, self.head_dim)
                self.k[i][rows].scatter_(2, index, k)
                self.v[i][rows].scatter_(2, index, v)
            kk, vv = self.k[i][rows, :, :end], self.v[i][rows, :, :end]
            if self.n_kv != self.n_heads:
                rep = self.n_heads // self.n_kv
                kk, vv = kk.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1)
            if decode:
                scores = torch.matmul(q, kk.transpose(-1, -2)).mul_(scale).add_(bias)
                out = torch.matmul(torch.softmax(scores, -1), vv)
            else:
                out = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
            out = out.transpose(1, 2).reshape(bsz, t, self.n_heads * self.head_dim)
            h = h + attn.o_proj(out)
            x = self._norm(h, layer.post_attention_layernorm.weight)
            w, b = self.gate_up[i]
            gate, up = F.linear(x, w, b).split((self.ffn, self.ffn), -1)
            h = h + layer.mlp.down_proj(F.silu(gate) * up)
        if all_positions:
            pass
        elif last is not None:
            h = h[torch.arange(bsz, device=self.device), last]
        else:
            h = h[:, -1]
        h = self._norm(h, m.norm.weight)
        return self.model.lm_head(h).float()

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        self.cache[:, dst, :, :length] = self.cache[:, src, :, :length]

    def slot_view(self, slot: int) -> torch.Tensor:
        """Slot ``slot``'s keys and values, ``[layers x 2, kv_heads, max_len, head_dim]`` (a view)."""
        return self.cache[:, slot]

    @property
    def block_shape(self) -> tuple[int, int, int]:
        """(planes, kv heads, head dim): a prefix-cache block's shape around its tokens."""
        return int(self.cache.shape[0]), int(self.n_kv), int(self.head_dim)
