"""The decode step of :class:`~assist.engine._runner.LlamaRunner`, compiled by ``torch.compile``.

Why: a decode step of a small model is a hundred small tensor operations, and in eager
mode each pays its dispatch. On the `tiny` checkpoint (1.1M parameters, one CPU thread) a
step of one row is about 1 ms, nearly all of it overhead. Inductor fuses the elementwise
work (norms, rotary embedding, masking, softmax, SiLU) into generated C++ loops; measured
here (bench/decode_step.py): one row 1.09 -> 0.55 ms, 16 rows 2.95 -> 1.91 ms.

The compiled function only *reads* the KV cache. The new token's key and value join
attention as one extra column, are returned, and one eager ``index_copy_`` writes them into
the cache after the call: a graph that wrote into the cache (a view of one large tensor)
would be functionalised into a copy of the whole cache on every step.

Shapes are dynamic: one graph serves every batch size and context length (torch gives
sizes 0 and 1 graphs of their own, compiled on first use; :meth:`CompiledDecode.warm_up`
compiles the common ones before the first request).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from assist.engine._runner import LlamaRunner

__all__ = ["CompiledDecode"]


def _step_fn(runner: LlamaRunner) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The decode step as a pure function of (tokens, positions, cache view); weights are
    the runner's own tensors, captured (so the graph holds no copies of them)."""
    m = runner.model.model
    layers = list(m.layers)
    n_heads, n_kv, dim, eps = runner.n_heads, runner.n_kv, runner.head_dim, runner.eps
    q_size, kv_size, ffn = runner.q_size, runner.kv_size, runner.ffn
    rep = n_heads // n_kv
    scale = dim ** -0.5
    half = dim // 2

    def norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = x.float()
        return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def step(tokens: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # tokens, positions: [B, 1]; kv: [layers x 2, B, kv heads, L, head dim], the rows'
        # cached keys and values before this token (position p sees cached keys j < p).
        bsz = tokens.shape[0]
        cached = kv.shape[3]
        h = m.embed_tokens(tokens)
        cos = runner.cos[positions][:, None]  # [B, 1, 1, D]
        sin = runner.sin[positions][:, None]
        visible = torch.arange(cached, device=tokens.device)[None, None, None, :] < positions[:, None, :, None]
        bias = torch.zeros(visible.shape, dtype=h.dtype, device=h.device).masked_fill(~visible, float("-inf"))
        new: list[torch.Tensor] = []
        for i, layer in enumerate(layers):
            w, b = runner.qkv[i]
            qk, v = F.linear(norm(h, layer.input_layernorm.weight), w, b).split((q_size + kv_size, kv_size), -1)
            qk = qk.view(bsz, 1, n_heads + n_kv, dim).transpose(1, 2)
            qk = qk * cos + torch.cat((-qk[..., half:], qk[..., :half]), -1) * sin
            q, k = qk.split((n_heads, n_kv), 1)
            v = v.view(bsz, 1, n_kv, dim).transpose(1, 2)
            new += [k, v]
            kk, vv, k1, v1 = kv[2 * i], kv[2 * i + 1], k, v
            if rep > 1:
                kk, vv = kk.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1)
                k1, v1 = k1.repeat_interleave(rep, 1), v1.repeat_interleave(rep, 1)
            scores = torch.cat((torch.matmul(q, kk.transpose(-1, -2)) + bias, (q * k1).sum(-1, keepdim=True)), -1)
            p = torch.softmax(scores * scale, -1)
            out = torch.matmul(p[..., :-1], vv) + p[..., -1:] * v1
            h = h + layer.self_attn.o_proj(out.transpose(1, 2).reshape(bsz, 1, n_heads * dim))
            w, b = runner.gate_up[i]
            gate, up = F.linear(norm(h, layer.post_attention_layernorm.weight), w, b).split((ffn, ffn), -1)
            h = h + layer.mlp.down_proj(F.silu(gate) * up)
        logits = runner.model.lm_head(norm(h[:, -1], m.norm.weight)).float()
        return logits, torch.stack(new)  # [layers x 2, B, kv heads, 1, head dim]

    return step


class CompiledDecode:
    """``runner``'s decode step (one new token per row), compiled. Call it as the runner's
    forward is called for a decode step; it writes the new keys and values itself."""

    def __init__(self, runner: LlamaRunner) -> None:
        self.runner = runner
        step = _step_fn(runner)
        # A code object of its own: dynamo keeps compiled graphs per code object, so runners
        # sharing `step`'s would share one cache, each call checking every runner's guards
        # (two engines in one process were slower than one, and filled the cache). Weights
        # stay captured rather than passed: forty tensor arguments cost 0.15 ms a step.
        own = types.FunctionType(step.__code__.replace(), step.__globals__, step.__name__,
                                 step.__defaults__, step.__closure__)
        self.fn = torch.compile(own, fullgraph=True)

    def applies(self, tokens: torch.Tensor, positions: torch.Tensor) -> bool:
        """A decode-shaped call: one token per row, each after at least one cached token."""
        return tokens.shape[1] == 1 and bool((positions > 0).all())

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, slot_start: int) -> torch.Tensor:
        r = self.runner
        bsz = tokens.shape[0]
        cached = int(positions.max())
        kv = r.cache[:, slot_start:slot_start + bsz, :, :cached]
        # Batch rows and cached length vary from step to step: symbolic in the graph. Only
        # those: with every size symbolic (dynamic=True), sizes that happen to be equal when
        # a graph is traced are assumed equal forever (16 rows and 4 heads, say), and the
        # next step that breaks the equality compiles again, seconds in a request.
        for t, dims in ((tokens, (0,)), (positions, (0,)), (kv, (1, 3))):
            for d in dims:
                torch._dynamo.maybe_mark_dynamic(t, d)
        logits, new = self.fn(tokens, positions, kv)
        # Row b's head h at position p of plane j, in the cache viewed as [-1, head_dim].
        planes, slots, heads = r.cache.shape[0], r.cache.shape[1], r.n_kv
        plane = torch.arange(planes, device=r.device)[:, None, None] * (slots * heads * r.max_len)
        row = torch.arange(slot_start, slot_start + bsz, device=r.device)[None, :, None] * (heads * r.max_len)
        head = torch.arange(heads, device=r.device)[None, None, :] * r.max_len
        flat = (plane + row + head + positions[:, :1][None]).reshape(-1)
        r.cache.view(-1, r.head_dim).index_copy_(0, flat, new.reshape(-1, r.head_dim))
        return logits

    def warm_up(self) -> None:
        """Compile the graphs of one row and of several before the first request (the
        compiled step writes into slots 0 and 1 at position 5: free slots, and a sequence's
        prefill overwrites every position it will read). Rows and positions differ from
        each other and from the model's fixed sizes, so no equality is traced in."""
        r = self.runner
        for bsz in (min(2, r.slots), 1):
            if r.max_len < 6:
                break
            self(torch.zeros((bsz, 1), dtype=torch.long, device=r.device),
                 torch.full((bsz, 1), 5, dtype=torch.long, device=r.device), 0)
