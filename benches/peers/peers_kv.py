"""kv_store peers: write k, v [tokens, kv_heads, head_dim] into the paged caches
[num_blocks, block_size, kv_heads, head_dim] at slot_mapping [tokens] (int64,
distinct random slots; with skip=1 about a quarter of the tokens, never the
last, get slot -1 and must be skipped). num_blocks = ceil(tokens/block_size)*pool.

Each cache is stored as [num_slots + 1, kv_heads, head_dim]: the last row is a
scratch row that the torch impls send skipped tokens to (torch.where on the
slots: index_copy_ cannot skip, and boolean masking would sync the host). The
cache proper is the first num_slots rows; only it is checked.
"""

import math

import torch

from bench_base import BenchBase, Impl
from check import Expect, tolerance
from common import Unavailable, compiled, import_peer, randn, torch_dtype, uniform


def eager_kv_store(k, v, k_store, v_store, slots):
    k_store.index_copy_(0, slots, k)
    v_store.index_copy_(0, slots, v)


def eager_kv_store_skip(k, v, k_store, v_store, slots, scratch: int):
    idx = torch.where(slots < 0, scratch, slots)
    k_store.index_copy_(0, idx, k)
    v_store.index_copy_(0, idx, v)


class Bench(BenchBase):
    kernel = "kv_store"

    def __init__(self, case, device="cuda"):
        super().__init__(case, device)
        self.tokens = case.int("tokens")
        self.kv_heads = case.int("kv_heads")
        self.head_dim = case.int("head_dim")
        self.block_size = case.int("block_size")
        self.pool = max(1, case.int("pool", 3))
        self.skip = case.flag("skip")
        self.num_blocks = math.ceil(self.tokens / self.block_size) * self.pool
        self.num_slots = self.num_blocks * self.block_size
        self.dtype = torch_dtype(case.dtype)

    def cache_view(self, store):
        return store[: self.num_slots].view(self.num_blocks, self.block_size, self.kv_heads, self.head_dim)

    def _slots(self, gen):
        slots = torch.randperm(self.num_slots, generator=gen, device=self.device)[: self.tokens].to(torch.int64)
        if self.skip and self.tokens > 1:
            drop = torch.rand(self.tokens, generator=gen, device=self.device) < 0.25
            drop[-1] = False
            slots = torch.where(drop, torch.full_like(slots, -1), slots)
        return slots

    def _set(self, make, gen, fill):
        shape = (self.tokens, self.kv_heads, self.head_dim)
        store = (self.num_slots + 1, self.kv_heads, self.head_dim)
        s = {"k": make(shape), "v": make(shape)}
        s["k_store"] = torch.empty(store, dtype=self.dtype, device=self.device)
        s["v_store"] = torch.empty(store, dtype=self.dtype, device=self.device)
        if fill is not None:
            s["k_store"].fill_(fill)
            s["v_store"].fill_(fill)
        s["slots"] = self._slots(gen)
        return s

    def check_set(self, gen):
        # Caches start all NaN (as ours): a write to a wrong slot, or a skipped
        # token written anyway, shows as a number where the reference has NaN.
        return self._set(lambda shape: randn(shape, self.dtype, gen, self.device), gen, float("nan"))

    def perf_set(self, gen, index):
        return self._set(lambda shape: uniform(shape, -1.0, 1.0, self.dtype, gen, self.device), gen, None)

    def tolerance(self):
        return tolerance(self.case.dtype, exact=True)  # a copy: bit-exact

    def expects(self, pristine, got):
        slots = pristine["slots"]
        keep = slots >= 0

        def ref_cache(x):
            c = torch.full((self.num_slots, self.kv_heads, self.head_dim), float("nan"), dtype=self.dtype, device=self.device)
            c[slots[keep]] = x[keep]
            return c.view(self.num_blocks, self.block_size, self.kv_heads, self.head_dim)

        rk, rv = ref_cache(pristine["k"]), ref_cache(pristine["v"])
        rows = max(1, (1 << 24) // max(1, self.block_size * self.kv_heads * self.head_dim))
        return [
            Expect("k_cache", got["k_cache"], lambda a, b: (rk[a:b], None), rows),
            Expect("v_cache", got["v_cache"], lambda a, b: (rv[a:b], None), rows),
        ]

    def impl(self, label):
        outputs = lambda s, ret: {  # noqa: E731
            "k_cache": self.cache_view(s["k_store"]),
            "v_cache": self.cache_view(s["v_store"]),
        }
        if label in ("torch_eager", "torch_compile"):
            wrap = compiled if label == "torch_compile" else (lambda f: f)
            if self.skip:
                f = wrap(eager_kv_store_skip)
                scratch = self.num_slots
                return Impl(
                    fn=lambda s: f(s["k"], s["v"], s["k_store"], s["v_store"], s["slots"], scratch),
                    outputs=outputs,
                )
            f = wrap(eager_kv_store)
            return Impl(fn=lambda s: f(s["k"], s["v"], s["k_store"], s["v_store"], s["slots"]), outputs=outputs)
        if label == "flashinfer":
            if self.skip:
                raise Unavailable("flashinfer.append_paged_kv_cache cannot skip tokens")
            page = import_peer("flashinfer.page")
            nb, bs, dev = self.num_blocks, self.block_size, self.device

            # The slot mapping as FlashInfer's ragged-append arguments: one
            # request owning every page in order, so token i goes to
            # page_iter = slot // page_size, entry = slot % page_size
            # (AppendPagedKVCacheKernel: indptr[batch_indices[i]] * page_size + positions[i]).
            # int32 index tensors are built here, outside the timed call.
            def prepare(s):
                t = s["slots"].shape[0]
                s["fi_batch_indices"] = torch.zeros(t, dtype=torch.int32, device=dev)
                s["fi_positions"] = s["slots"].to(torch.int32)
                s["fi_kv_indices"] = torch.arange(nb, dtype=torch.int32, device=dev)
                s["fi_kv_indptr"] = torch.tensor([0, nb], dtype=torch.int32, device=dev)
                s["fi_last_page_len"] = torch.tensor([bs], dtype=torch.int32, device=dev)
                del s["slots"]
                return s

            # append_paged_kv_cache(append_key, append_value, batch_indices, positions,
            #     paged_kv_cache, kv_indices, kv_indptr, kv_last_page_len, kv_layout="NHD")
            def fi(s):
                page.append_paged_kv_cache(
                    s["k"],
                    s["v"],
                    s["fi_batch_indices"],
                    s["fi_positions"],
                    (self.cache_view(s["k_store"]), self.cache_view(s["v_store"])),
                    s["fi_kv_indices"],
                    s["fi_kv_indptr"],
                    s["fi_last_page_len"],
                    kv_layout="NHD",
                )

            return Impl(fn=fi, outputs=outputs, prepare=prepare)
        raise Unavailable(f"no impl {label!r} for kv_store")
