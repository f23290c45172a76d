"""prefill_attention peers: q [batch * q_len, q_heads, head_dim] packed (every
sequence q_len new tokens after `prefix` cached ones: the perf cases are not
ragged), caches [num_blocks, block_size, kv_heads, head_dim] with num_blocks =
batch*ceil((prefix+q_len)/block_size)*pool, block tables the first entries of
a random permutation of the blocks, causal with the new tokens last (query i
at position prefix + i), softmax scale 1/sqrt(head_dim), GQA.

torch_sdpa_flash / torch_sdpa_cudnn: F.scaled_dot_product_attention with
is_causal=True under one backend (FLASH_ATTENTION, CUDNN_ATTENTION), on the
K/V gathered into contiguous [batch, kv_heads, ctx, head_dim] tensors outside
the timed call (the contiguous-cache baseline), enable_gqa=True. SDPA's causal
mask is aligned top-left, so only prefix=0 cases run.
flashinfer: BatchPrefillWithPagedKVCacheWrapper on our paged caches (NHD),
causal=True (FlashInfer aligns the mask bottom-right, as ours).
"""


import torch
import torch.nn.functional as F

from bench_base import Impl
from check import Expect, rows_per_chunk
from common import Unavailable, import_peer
from paged_kv import PagedKvBench

FI_WORKSPACE_BYTES = 128 << 20

SDPA_BACKENDS = {
    "torch_sdpa_flash": "FLASH_ATTENTION",
    "torch_sdpa_cudnn": "CUDNN_ATTENTION",
}


class Bench(PagedKvBench):
    kernel = "prefill_attention"

    def __init__(self, case, device="cuda"):
        super().__init__(case, device)
        self._paged_init(case)
        self.q_len = case.int("q_len")
        self.prefix = case.int("prefix", 0)
        if case.flag("ragged"):
            raise Unavailable("ragged=1 not modelled by the peer bench (every sequence q_len tokens)")
        self.ctx = self.prefix + self.q_len
        self.total = self.batch * self.q_len
        self.q_rows = self.total  # the packed new tokens
        self._paged_layout()

    def expects(self, pristine, got):
        kv, g, d, n = self.kv_heads, self.q_heads // self.kv_heads, self.head_dim, self.q_len
        kflat = pristine["k_cache"].view(-1, kv, d)
        vflat = pristine["v_cache"].view(-1, kv, d)
        q, tables = pristine["q"], pristine["tables"]

        def ref(a, b):
            """Rows a..b of out: per sequence they overlap, causal attention in f64."""
            outs, mags = [], []
            row = a
            while row < b:
                seq, i0 = divmod(row, n)
                i1 = min(n, i0 + (b - row))
                idx = self._slot_index(tables[seq:seq + 1])[0]  # [ctx]
                k = kflat[idx].double().permute(1, 0, 2)  # [kv, ctx, d]
                v = vflat[idx].double().permute(1, 0, 2)
                qq = q[seq * n + i0:seq * n + i1].double().view(i1 - i0, kv, g, d)
                s = torch.einsum("nhgd,htd->nhgt", qq, k) * self.scale
                pos = self.prefix + torch.arange(i0, i1, device=q.device)  # [rows]
                keys = torch.arange(self.ctx, device=q.device)
                s = s.masked_fill((keys[None, :] > pos[:, None])[:, None, None, :], float("-inf"))
                p = torch.softmax(s, dim=-1)
                outs.append(torch.einsum("nhgt,htd->nhgd", p, v).reshape(i1 - i0, kv * g, d))
                # sum_j p_j |v_j|: the scale ours compares against.
                mags.append(torch.einsum("nhgt,htd->nhgd", p, v.abs()).reshape(i1 - i0, kv * g, d))
                row += i1 - i0
            return torch.cat(outs), torch.cat(mags)

        return [Expect("out", got["out"], ref, rows_per_chunk(4 * self.ctx * self.q_heads))]

    def impl(self, label):
        B, Hq, Hkv, D, n, scale = self.batch, self.q_heads, self.kv_heads, self.head_dim, self.q_len, self.scale

        if label in SDPA_BACKENDS:
            if self.prefix:
                raise Unavailable("SDPA's is_causal aligns the mask top-left: prefix > 0 is not causal prefill there")
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backend = getattr(SDPBackend, SDPA_BACKENDS[label])

            def prepare(s):
                idx = self._slot_index(s.pop("tables"))  # [B, ctx]
                for name, dst in (("k_cache", "k"), ("v_cache", "v")):
                    flat = s.pop(name).view(-1, Hkv, D)
                    s[dst] = flat[idx].permute(0, 2, 1, 3).contiguous()  # [B, Hkv, ctx, D]
                s["q4"] = s["q"].view(B, n, Hq, D).transpose(1, 2)  # [B, Hq, n, D] (a view)
                return s

            def fn(s):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(
                        s["q4"], s["k"], s["v"], is_causal=True, scale=scale, enable_gqa=True
                    )

            return Impl(
                fn=fn,
                outputs=lambda s, ret: {"out": ret.transpose(1, 2).reshape(B * n, Hq, D)},
                prepare=prepare,
            )

        if label == "flashinfer":
            prefill = import_peer("flashinfer.prefill")
            used, bs, dev, dt, ctx = self.mbps, self.block_size, self.device, self.dtype, self.ctx
            if self._fi_workspace is None:
                self._fi_workspace = torch.zeros(FI_WORKSPACE_BYTES, dtype=torch.uint8, device=dev)
            ws = self._fi_workspace

            # One wrapper per set (each set has its own block table), planned
            # here, outside the timed call; fixed index buffers for graph capture.
            def prepare(s):
                tables = s.pop("tables")
                qo_indptr = torch.arange(B + 1, dtype=torch.int32, device=dev) * n
                kv_indptr = torch.arange(B + 1, dtype=torch.int32, device=dev) * used
                indices = tables[:, :used].reshape(-1).to(torch.int32).contiguous()
                last = torch.full((B,), ctx - (used - 1) * bs, dtype=torch.int32, device=dev)
                w = prefill.BatchPrefillWithPagedKVCacheWrapper(
                    ws,
                    "NHD",
                    use_cuda_graph=True,
                    qo_indptr_buf=torch.empty(B + 1, dtype=torch.int32, device=dev),
                    paged_kv_indptr_buf=torch.empty(B + 1, dtype=torch.int32, device=dev),
                    paged_kv_indices_buf=torch.empty(B * used, dtype=torch.int32, device=dev),
                    paged_kv_last_page_len_buf=torch.empty(B, dtype=torch.int32, device=dev),
                )
                # plan(qo_indptr, paged_kv_indptr, paged_kv_indices,
                #      paged_kv_last_page_len, num_qo_heads, num_kv_heads,
                #      head_dim_qk, page_size, ..., causal, ..., sm_scale, ...,
                #      q_data_type, kv_data_type)
                w.plan(
                    qo_indptr, kv_indptr, indices, last, Hq, Hkv, D, bs,
                    causal=True, pos_encoding_mode="NONE", sm_scale=scale, q_data_type=dt, kv_data_type=dt,
                )
                s["fi_wrapper"] = w
                return s

            # run(q, paged_kv_cache=(k_cache, v_cache), *, out=None, ...) -> out
            return Impl(
                fn=lambda s: s["fi_wrapper"].run(s["q"], (s["k_cache"], s["v_cache"]), out=s["out"]),
                outputs=lambda s, ret: {"out": s["out"]},
                prepare=prepare,
            )
        raise Unavailable(f"no impl {label!r} for prefill_attention")
