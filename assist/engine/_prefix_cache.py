"""Automatic prefix caching: KV blocks of token prefixes, shared between requests.

Multi-call strategies resend their whole conversation on every call (``reflect``'s second
call repeats the first plus the critique, each turn of ``tools`` repeats the last), and eval
items share a system prompt; recomputing those prefixes is most of a prefill. This cache
keeps the keys and values of full blocks of ``block_size`` tokens, keyed as vLLM keys them:
block ``i``'s key is a hash of block ``i - 1``'s key and block ``i``'s tokens, so a key names
the whole prefix up to the block's end, and two prompts share exactly their common full
blocks.

The engine keeps a KV cache per slot (:class:`assist.engine.LlamaRunner`), so blocks are
copied, not mapped: on admission the longest cached prefix is copied into the request's
slot and only the rest is prefilled; after a prefill and when a sequence ends, the slot's
new full blocks are copied in. The blocks live in one preallocated pool of
``budget_bytes // block_bytes`` blocks, claimed at start, so the budget is never exceeded. A block is
pinned (reference-counted) while a request reads it; an unpinned block stays cached and
is evicted least recently used first, when a new block needs its place.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

import torch

__all__ = ["BLOCK_SIZE", "PrefixCache"]

BLOCK_SIZE = 16  # tokens per block (vLLM's default)


def block_hashes(tokens: Sequence[int], block_size: int, blocks: int,
                 known: Sequence[bytes] = ()) -> list[bytes]:
    """The chained keys of the first ``blocks`` full blocks of ``tokens``; ``known``: keys of
    a leading part already computed (reused, not recomputed). A cryptographic digest, so a
    prompt cannot be crafted to collide with another's prefix and read its keys and values."""
    out = list(known[:blocks])
    parent = out[-1] if out else b""
    for i in range(len(out), blocks):
        ids = array("q", tokens[i * block_size:(i + 1) * block_size]).tobytes()
        parent = hashlib.blake2b(parent + ids, digest_size=16).digest()
        out.append(parent)
    return out


class PrefixCache:
    """A pool of KV blocks, each ``[layers x 2, kv_heads, block_size, head_dim]``, keyed by
    chained prefix hashes; reference-counted, evicted least recently used.

    Slot views (what :meth:`load` and :meth:`store` copy from and to) are
    ``[layers x 2, kv_heads, max_len, head_dim]``: a slot of the runner's cache.
    """

    def __init__(self, block_shape: tuple[int, int, int], *, budget_bytes: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", block_size: int = BLOCK_SIZE) -> None:
        planes, heads, head_dim = block_shape
        self.block_size = block_size
        self.block_bytes = planes * heads * block_size * head_dim * torch.empty((), dtype=dtype).element_size()
        self.capacity = max(0, budget_bytes // self.block_bytes)
        # Claimed (written) now, as vLLM claims its KV cache: left to the OS to allocate lazily,
        # the pool's first fill page-faults inside decode steps (measured: 5% off the
        # throughput of traffic that never hits, until the pool is full once).
        self.pool = torch.zeros((self.capacity, planes, heads, block_size, head_dim), dtype=dtype, device=device)
        self.table: dict[bytes, int] = {}  # prefix key -> block id
        self.keys: list[bytes | None] = [None] * self.capacity  # block id -> its key
        self.refs = [0] * self.capacity
        # Unpinned cached blocks, least recently used first: the eviction order.
        self.idle: OrderedDict[int, None] = OrderedDict()
        self.free = list(range(self.capacity - 1, -1, -1))  # never used (popped from the end)
        self.evictions = 0

    @property
    def used(self) -> int:
        """Blocks holding a cached prefix."""
        return len(self.table)

    @property
    def used_bytes(self) -> int:
        return self.used * self.block_bytes

    def hashes(self, tokens: Sequence[int], known: Sequence[bytes] = ()) -> list[bytes]:
        """The keys of every full block of ``tokens``."""
        return block_hashes(tokens, self.block_size, len(tokens) // self.block_size, known)

    # -- reading ------------------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes], limit_blocks: int) -> list[int]:
        """The blocks of the longest cached prefix among the first ``limit_blocks`` keys,
        pinned: the caller copies them out, then :meth:`release` them."""
        ids: list[int] = []
        for key in keys[:limit_blocks]:
            block = self.table.get(key)
            if block is None:
                break
            ids.append(block)
        for block in ids:
            self.refs[block] += 1
            self.idle.pop(block, None)
        return ids

    def release(self, ids: Sequence[int]) -> None:
        """Unpin blocks. The deepest first, so a prefix's tail is evicted before its head
        (which more prompts share): each release makes a block the most recently used."""
        for block in reversed(ids):
            if self.refs[block] <= 0:
                raise ValueError(f"block {block} released more often than looked up")
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.idle[block] = None

    def load(self, ids: Sequence[int], dst: torch.Tensor) -> None:
        """Copy blocks ``ids`` (a prefix, in order) into the start of slot view ``dst``."""
        if not ids:
            return
        planes, heads, _, head_dim = dst.shape
        blocks = self.pool[torch.tensor(ids, device=self.pool.device)]  # [n, planes, heads, B, D]
        dst[:, :, :len(ids) * self.block_size] = blocks.permute(1, 2, 0, 3, 4).reshape(planes, heads, -1, head_dim)

    # -- writing ------------------------------------------------------------------------------
    def store(self, keys: Sequence[bytes], src: torch.Tensor) -> int:
        """Cache the blocks of slot view ``src`` whose ``keys`` (the slot's full blocks, in
        order) are not cached yet; the ones already cached become recently used. Returns the
        number of blocks added (fewer when every block is pinned and the pool is full)."""
        return self.store_many([(keys, 0)], src.unsqueeze(1))

    def store_many(self, chains: Sequence[tuple[Sequence[bytes], int]], cache: torch.Tensor) -> int:
        """:meth:`store` for several slots of ``cache`` (``[layers x 2, slots, kv_heads,
        max_len, head_dim]``, the runner's) at once: ``chains`` are (keys, slot); each slot's
        new blocks are one copy."""
        for keys, _ in chains:
            self._touch(keys)  # first, so making room never evicts a chain's own head
        added = 0
        for keys, slot in chains:
            positions: list[int] = []  # block indices within the slot
            ids: list[int] = []
            for i, key in enumerate(keys):
                if key in self.table:
                    continue
                block = self._allocate()
                if block is None:
                    break  # full of pinned blocks
                self.table[key] = block
                self.keys[block] = key
                positions.append(i)
                ids.append(block)
            if ids:
                self._copy_in(cache[:, slot], positions, ids)
                added += len(ids)
        for keys, _ in chains:
            self._touch(keys)
        return added

    def _copy_in(self, src: torch.Tensor, positions: list[int], ids: list[int]) -> None:
        """Copy blocks ``positions`` of slot view ``src`` into pool blocks ``ids``: one copy
        straight from the slot (a gather across slots first would copy everything twice)."""
        b, first, last = self.block_size, positions[0], positions[-1] + 1
        view = src[:, :, first * b:last * b].unflatten(2, (last - first, b))  # [planes, heads, n, B, D]
        if last - first != len(positions):  # not one run of blocks (rare): gather the ones asked
            view = view.index_select(2, torch.tensor([p - first for p in positions], device=src.device))
        self.pool.index_copy_(0, torch.tensor(ids, device=self.pool.device),
                              view.permute(2, 0, 1, 3, 4).to(self.pool.device))

    def _touch(self, keys: Sequence[bytes]) -> None:
        """Make a chain's unpinned blocks the most recently used, its head last (most recent):
        a prefix's tail is evicted before its head, which more prompts share."""
        for key in reversed(keys):
            block = self.table.get(key)
            if block is not None and self.refs[block] == 0:
                self.idle[block] = None
                self.idle.move_to_end(block)

    def _allocate(self) -> int | None:
        if self.free:
            return self.free.pop()
        if not self.idle:
            return None
        block, _ = self.idle.popitem(last=False)  # the least recently used unpinned block
        key = self.keys[block]
        if key is not None:
            del self.table[key]
        self.keys[block] = None
        self.evictions += 1
        return block

    def clear(self) -> None:
        """Forget every unpinned block."""
        for block in list(self.idle):
            key = self.keys[block]
            if key is not None:
                del self.table[key]
            self.keys[block] = None
            self.free.append(block)
        self.idle.clear()
