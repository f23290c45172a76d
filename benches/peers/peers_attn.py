"""paged_attention (decode) peers: q [batch, q_heads, head_dim], caches
[num_blocks, block_size, kv_heads, head_dim] with num_blocks =
batch*ceil(ctx/block_size)*pool, block tables [batch, ceil(ctx/block_size)] the
first entries of a random permutation of the blocks, every sequence ctx tokens,
softmax scale 1/sqrt(head_dim), GQA.

torch_sdpa runs on the same K/V gathered into contiguous [batch, kv_heads, ctx,
head_dim] tensors outside the timed call: the contiguous-cache baseline.
torch_eager / torch_compile gather through the block table inside the call,
then SDPA: what plain PyTorch does for paged decode.
"""


import torch
import torch.nn.functional as F

from bench_base import Impl
from check import Expect, rows_per_chunk
from common import Unavailable, compiled, import_peer
from paged_kv import PagedKvBench

FI_WORKSPACE_BYTES = 128 << 20


def eager_paged_decode(q, k_cache, v_cache, tables, ctx: int, scale: float):
    k = k_cache[tables].flatten(1, 2)[:, :ctx].transpose(1, 2)  # [B, Hkv, ctx, D]
    v = v_cache[tables].flatten(1, 2)[:, :ctx].transpose(1, 2)
    o = F.scaled_dot_product_attention(q.unsqueeze(2), k, v, scale=scale, enable_gqa=True)
    return o.squeeze(2)


def sdpa_decode(q4, k, v, scale: float):
    return F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True)


class Bench(PagedKvBench):
    kernel = "paged_attention"

    def __init__(self, case, device="cuda"):
        super().__init__(case, device)
        self._paged_init(case)
        self.ctx = case.int("ctx")
        if self.ctx < 1:
            raise Unavailable("ctx=0")
        self.q_rows = self.batch  # one query a sequence
        self._paged_layout()

    def expects(self, pristine, got):
        kv, g, d = self.kv_heads, self.q_heads // self.kv_heads, self.head_dim
        kflat = pristine["k_cache"].view(-1, kv, d)
        vflat = pristine["v_cache"].view(-1, kv, d)
        q, tables = pristine["q"], pristine["tables"]

        def ref(a, b):
            n = b - a
            idx = self._slot_index(tables[a:b])  # [n, ctx]
            k = kflat[idx].double().permute(0, 2, 1, 3)  # [n, kv, ctx, d]
            v = vflat[idx].double().permute(0, 2, 1, 3)
            qq = q[a:b].double().view(n, kv, g, d)
            p = torch.softmax(torch.einsum("nhgd,nhtd->nhgt", qq, k) * self.scale, dim=-1)
            out = torch.einsum("nhgt,nhtd->nhgd", p, v).reshape(n, kv * g, d)
            # sum_j p_j |v_j|: the magnitude of the averaged terms, which f32
            # accumulation error scales with (ours passes the same scale).
            mag = torch.einsum("nhgt,nhtd->nhgd", p, v.abs()).reshape(n, kv * g, d)
            return out, mag

        return [Expect("out", got["out"], ref, rows_per_chunk(self.ctx * kv * d * 4))]

    def impl(self, label):
        B, Hq, Hkv, D, ctx, scale = self.batch, self.q_heads, self.kv_heads, self.head_dim, self.ctx, self.scale
        out_of_set = lambda s, ret: {"out": s["out"]}  # noqa: E731

        if label in ("torch_eager", "torch_compile"):
            f = compiled(eager_paged_decode) if label == "torch_compile" else eager_paged_decode

            def prepare(s):
                s["tables_long"] = s.pop("tables").long()
                return s

            return Impl(
                fn=lambda s: f(s["q"], s["k_cache"], s["v_cache"], s["tables_long"], ctx, scale),
                outputs=lambda s, ret: {"out": ret},
                prepare=prepare,
            )

        if label == "torch_sdpa":

            def prepare(s):
                idx = self._slot_index(s.pop("tables"))  # [B, ctx]
                for name, dst in (("k_cache", "k"), ("v_cache", "v")):
                    flat = s.pop(name).view(-1, Hkv, D)
                    s[dst] = flat[idx].permute(0, 2, 1, 3).contiguous()  # [B, Hkv, ctx, D]
                s["q4"] = s["q"].view(B, Hq, 1, D)
                return s

            return Impl(
                fn=lambda s: sdpa_decode(s["q4"], s["k"], s["v"], scale),
                outputs=lambda s, ret: {"out": ret.view(B, Hq, D)},
                prepare=prepare,
            )

        if label == "flashinfer":
            decode = import_peer("flashinfer.decode")
            used, bs, dev, dt = self.mbps, self.block_size, self.device, self.dtype
            if self._fi_workspace is None:
                # Shared by every set's wrapper: plan() only assigns offsets in
                # the float workspace (PrefillPlan), and the runs are sequential.
                self._fi_workspace = torch.zeros(FI_WORKSPACE_BYTES, dtype=torch.uint8, device=dev)
            ws = self._fi_workspace

            # One wrapper per set (each set has its own block table), built and
            # planned here, outside the timed call: plan() is host-side work.
            # use_cuda_graph=True keeps the plan's index buffers at fixed
            # addresses for graph capture; use_tensor_cores=True (the CUDA-core
            # path refuses GQA group sizes 6 and 7).
            def prepare(s):
                tables = s.pop("tables")
                indptr = torch.arange(B + 1, dtype=torch.int32, device=dev) * used
                indices = tables[:, :used].reshape(-1).to(torch.int32).contiguous()
                last = torch.full((B,), ctx - (used - 1) * bs, dtype=torch.int32, device=dev)
                w = decode.BatchDecodeWithPagedKVCacheWrapper(
                    ws,
                    "NHD",
                    use_cuda_graph=True,
                    use_tensor_cores=True,
                    paged_kv_indptr_buffer=torch.empty(B + 1, dtype=torch.int32, device=dev),
                    paged_kv_indices_buffer=torch.empty(B * used, dtype=torch.int32, device=dev),
                    paged_kv_last_page_len_buffer=torch.empty(B, dtype=torch.int32, device=dev),
                )
                # plan(indptr, indices, last_page_len, num_qo_heads, num_kv_heads,
                #      head_dim, page_size, pos_encoding_mode="NONE", ...,
                #      q_data_type, kv_data_type, sm_scale)
                w.plan(
                    indptr, indices, last, Hq, Hkv, D, bs,
                    pos_encoding_mode="NONE", q_data_type=dt, kv_data_type=dt, sm_scale=scale,
                )
                s["fi_wrapper"] = w
                return s

            # run(q, paged_kv_cache=(k_cache, v_cache), *, out=None, ...) -> out
            return Impl(
                fn=lambda s: s["fi_wrapper"].run(s["q"], (s["k_cache"], s["v_cache"]), out=s["out"]),
                outputs=out_of_set,
                prepare=prepare,
            )
        raise Unavailable(f"no impl {label!r} for paged_attention")
