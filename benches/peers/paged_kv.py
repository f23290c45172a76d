"""What the two attention peer benches share: a paged KV cache
[num_blocks, block_size, kv_heads, head_dim] with num_blocks =
batch*ceil(ctx/block_size)*pool, block tables [batch, ceil(ctx/block_size)]
the first entries of a random permutation of the blocks (every sequence ctx
tokens), softmax scale 1/sqrt(head_dim), GQA, and q [q_rows, q_heads,
head_dim] (decode: one row a sequence; prefill: the packed new tokens).
"""

import math

import torch

from bench_base import BenchBase
from check import tolerance
from common import Unavailable, randn, torch_dtype, uniform


class PagedKvBench(BenchBase):
    """Subclasses set self.ctx (tokens a sequence holds in the cache) and
    self.q_rows before calling `_paged_init`."""

    def _paged_init(self, case):
        self.batch = case.int("batch")
        self.q_heads = case.int("q_heads")
        self.kv_heads = case.int("kv_heads")
        self.head_dim = case.int("head_dim")
        self.block_size = case.int("block_size")
        self.pool = max(1, case.int("pool", 3))
        if self.q_heads % self.kv_heads:
            raise Unavailable("q_heads is not a multiple of kv_heads")

    def _paged_layout(self):
        """After self.ctx is known: the pool and the softmax scale."""
        self.mbps = max(1, math.ceil(self.ctx / self.block_size))
        self.num_blocks = self.batch * self.mbps * self.pool
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.dtype = torch_dtype(self.case.dtype)
        self._fi_workspace = None

    def _tables(self, gen):
        perm = torch.randperm(self.num_blocks, generator=gen, device=self.device)
        return perm[: self.batch * self.mbps].to(torch.int32).view(self.batch, self.mbps)

    def _slot_index(self, tables):
        """[n, ctx] int64 flat slot of every live token of the sequences in tables."""
        j = torch.arange(self.ctx, device=tables.device)
        return tables.long()[:, j // self.block_size] * self.block_size + (j % self.block_size)

    def _empty_set(self, gen):
        cache = (self.num_blocks, self.block_size, self.kv_heads, self.head_dim)
        return cache, {
            "tables": self._tables(gen),
            "out": torch.empty((self.q_rows, self.q_heads, self.head_dim), dtype=self.dtype, device=self.device),
        }

    def check_set(self, gen):
        # NaN in every slot that holds no live token (as ours): reading past
        # ctx, or a wrong block, turns the output NaN.
        cache, s = self._empty_set(gen)
        s["q"] = randn((self.q_rows, self.q_heads, self.head_dim), self.dtype, gen, self.device)
        idx = self._slot_index(s["tables"]).reshape(-1)
        for name in ("k_cache", "v_cache"):
            c = torch.full(cache, float("nan"), dtype=self.dtype, device=self.device)
            flat = c.view(-1, self.kv_heads, self.head_dim)
            flat[idx] = randn((idx.numel(), self.kv_heads, self.head_dim), self.dtype, gen, self.device)
            s[name] = c
        return s

    def perf_set(self, gen, index):
        cache, s = self._empty_set(gen)
        s["q"] = uniform((self.q_rows, self.q_heads, self.head_dim), -1.0, 1.0, self.dtype, gen, self.device)
        s["k_cache"] = uniform(cache, -1.0, 1.0, self.dtype, gen, self.device)
        s["v_cache"] = uniform(cache, -1.0, 1.0, self.dtype, gen, self.device)
        return s

    def tolerance(self):
        return tolerance(self.case.dtype)
