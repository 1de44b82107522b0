"""Which responses form each update mini-batch: rollout order, or EasyR1's balanced order.

Rollout order (`rl.balance_batch=0`): mini-batch j is prompts [j*m, (j+1)*m) with all G
responses each.

Balanced order (`rl.balance_batch=k`, the release with k = its 8 GPUs): EasyR1 first reorders
the rollout's N responses so that each of its k data-parallel ranks gets N / k responses of
near-equal total tokens (prompt + response: `_balance_batch`, the Karmarkar-Karp largest
differencing method over equal-size parts, each part in rollout order), then every rank splits
its part into the mini-batches, so mini-batch j is the j-th slice of every part. A mini-batch
then mixes responses by length and may hold only some of a prompt's G responses.
`karmarkar_karp` reproduces the release's partition (its order of ties included), so the
mini-batches are the release's; the per-rank token balance itself does not apply here (one
SPMD program splits each micro-batch over the devices).
"""
from __future__ import annotations

import heapq

import numpy as np


class _Part:
    """A part being built: its items (index, tokens) in the order they joined, and their sum.
    Parts order by (sum, size, items), as the release's."""

    def __init__(self, items):
        self.items = list(items)
        self.sum = sum(v for _, v in self.items)

    def key(self):
        return self.sum, len(self.items), self.items


class _Partial:
    """k parts (largest first) of some of the items; the heap pops the one with the largest
    spread first (ties: the one whose largest part is larger)."""

    def __init__(self, parts: list[_Part]):
        self.parts = sorted(parts, key=_Part.key, reverse=True)

    @property
    def spread(self) -> int:
        return self.parts[0].sum - self.parts[-1].sum

    def __lt__(self, other: "_Partial") -> bool:
        if self.spread != other.spread:
            return self.spread > other.spread
        return self.parts[0].key() > other.parts[0].key()

    def merge(self, other: "_Partial") -> None:
        """Join the largest of one with the smallest of the other, and so on."""
        k = len(self.parts)
        for i in range(k):
            self.parts[i].items += other.parts[k - 1 - i].items
            self.parts[i].sum += other.parts[k - 1 - i].sum
        self.parts = sorted(self.parts, key=_Part.key, reverse=True)


def karmarkar_karp(tokens, k: int) -> list[np.ndarray]:
    """k parts of equal size (indices ascending) of items with these token counts, of
    near-equal sums: the largest differencing method as EasyR1 runs it (items sorted by
    (tokens, index) and taken k at a time as k one-item parts; the partial solutions with the
    largest spread merged first)."""
    tokens = [int(t) for t in tokens]
    n = len(tokens)
    if k < 1 or n % k:
        raise ValueError(f"balance_batch: {n} responses do not split into {k} equal parts")
    ordered = sorted((t, i) for i, t in enumerate(tokens))
    heap = [_Partial([_Part([(i, t)]) for t, i in ordered[s:s + k]]) for s in range(0, n, k)]
    heapq.heapify(heap)
    while len(heap) > 1:
        first, second = heapq.heappop(heap), heapq.heappop(heap)
        first.merge(second)
        heapq.heappush(heap, first)
    return [np.sort(np.asarray([i for i, _ in p.items], np.int64)) for p in heap[0].parts]


def mini_batch_rows(num_prompts: int, group_size: int, prompts_per_mini_batch: int,
                    seq_tokens=None, partitions: int = 0) -> list[np.ndarray]:
    """Response rows (prompt-major, row b*G + g) of each update mini-batch, ascending.

    partitions 0: rollout order (whole prompts, the last mini-batch possibly smaller); else
    EasyR1's balanced order over that many parts (module docstring), by seq_tokens [N] (each
    response's prompt + response tokens).
    """
    n, per = num_prompts * group_size, prompts_per_mini_batch * group_size
    if not partitions:
        return [np.arange(s, min(s + per, n)) for s in range(0, n, per)]
    if seq_tokens is None or len(seq_tokens) != n:
        raise ValueError(f"balance_batch needs the token count of each of the {n} responses")
    mini_batches = -(-n // per)
    parts = karmarkar_karp(seq_tokens, partitions)
    if len(parts[0]) % mini_batches:
        raise ValueError(f"balance_batch: parts of {len(parts[0])} responses do not split into "
                         f"{mini_batches} mini-batches")
    share = len(parts[0]) // mini_batches
    return [np.sort(np.concatenate([p[j * share:(j + 1) * share] for p in parts]))
            for j in range(mini_batches)]
