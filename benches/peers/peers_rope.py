"""rope peers: NeoX-style (rotate halves) in place on q [tokens, q_heads, head_dim]
and k [tokens, kv_heads, head_dim] at positions [tokens] (int32, random in
[0, max_pos)), with cos/sin from an f32 cache [max_pos, head_dim] (cos half,
then sin half). The cache is built like ours (kernels::rope::cos_sin_table:
angles in f64, rounded to f32) and shared by all sets, as ours shares its table.
"""

import torch

from bench_base import BenchBase, Impl
from check import Expect, rows_per_chunk, tolerance
from common import Unavailable, compiled, import_peer, randn, torch_dtype, uniform


def cos_sin_cache(max_pos, head_dim, theta, device):
    half = head_dim // 2
    i = torch.arange(half, dtype=torch.float64, device=device)
    inv = theta ** (-2.0 * i / head_dim)
    a = torch.arange(max_pos, dtype=torch.float64, device=device)[:, None] * inv[None, :]
    return torch.cat([a.cos(), a.sin()], dim=-1)  # [max_pos, head_dim] f64


# In-place NeoX RoPE from a cos|sin cache, computed in f32 (vLLM's
# RotaryEmbedding.forward_native, writing back into q and k).
def eager_rope(q, k, cache, positions):
    half = cache.shape[-1] // 2
    cs = cache.index_select(0, positions)  # [tokens, head_dim] f32
    cos = cs[:, None, :half]
    sin = cs[:, None, half:]
    for x in (q, k):
        x1 = x[..., :half].float()
        x2 = x[..., half:].float()
        o1 = x1 * cos - x2 * sin  # both halves before writing back: for f32
        o2 = x2 * cos + x1 * sin  # inputs .float() is the same tensor
        x[..., :half].copy_(o1)
        x[..., half:].copy_(o2)


class Bench(BenchBase):
    kernel = "rope"

    def __init__(self, case, device="cuda"):
        super().__init__(case, device)
        self.tokens = case.int("tokens")
        self.q_heads = case.int("q_heads")
        self.kv_heads = case.int("kv_heads")
        self.head_dim = case.int("head_dim")
        self.max_pos = case.int("max_pos", 4096)
        self.theta = case.float("theta", 1e6)
        if self.head_dim % 2:
            raise Unavailable(f"head_dim {self.head_dim} is odd")
        self.dtype = torch_dtype(case.dtype)
        self.cache = cos_sin_cache(self.max_pos, self.head_dim, self.theta, device).float()
        half = self.head_dim // 2
        # Liger takes cos and sin separately: the two halves of the same table.
        self.cos = self.cache[:, :half].contiguous()
        self.sin = self.cache[:, half:].contiguous()

    def _set(self, make, gen):
        t, d = self.tokens, self.head_dim
        pos = torch.randint(0, self.max_pos, (t,), generator=gen, device=self.device, dtype=torch.int32)
        return {
            "q": make((t, self.q_heads, d)),
            "k": make((t, self.kv_heads, d)),
            "positions": pos,
            "cache": self.cache,
            "cos": self.cos,
            "sin": self.sin,
        }

    def check_set(self, gen):
        return self._set(lambda shape: randn(shape, self.dtype, gen, self.device), gen)

    def perf_set(self, gen, index):
        return self._set(lambda shape: uniform(shape, -1.0, 1.0, self.dtype, gen, self.device), gen)

    def tolerance(self):
        return tolerance(self.case.dtype)

    def expects(self, pristine, got):
        half, theta, d = self.head_dim // 2, self.theta, self.head_dim
        pos = pristine["positions"].long()
        inv = theta ** (-2.0 * torch.arange(half, dtype=torch.float64, device=pos.device) / d)

        def make_ref(x):
            def ref(a, b):
                xs = x[a:b].double()
                ang = pos[a:b].double()[:, None, None] * inv  # [rows, 1, half]
                c, s = ang.cos(), ang.sin()
                x1, x2 = xs[..., :half], xs[..., half:]
                out = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
                # f32 rounding scales with the pair's norm, not the (maybe
                # cancelled) result: ours passes the same scale.
                n = torch.hypot(x1, x2)
                return out, torch.cat([n, n], dim=-1)

            return ref

        chunk_q = rows_per_chunk(self.q_heads * d * 6)
        chunk_k = rows_per_chunk(self.kv_heads * d * 6)
        return [
            Expect("q", got["q"], make_ref(pristine["q"]), chunk_q),
            Expect("k", got["k"], make_ref(pristine["k"]), chunk_k),
        ]

    def impl(self, label):
        d = self.head_dim
        outputs = lambda s, ret: {"q": s["q"], "k": s["k"]}  # noqa: E731 (all in place)
        if label in ("torch_eager", "torch_compile"):
            f = compiled(eager_rope) if label == "torch_compile" else eager_rope
            return Impl(fn=lambda s: f(s["q"], s["k"], s["cache"], s["positions"]), outputs=outputs)
        if label == "liger_gather_cos_sin":
            Fn = import_peer("liger_kernel.ops.rope").LigerRopeFunction

            # LigerRopeFunction.forward(ctx, q, k, cos, sin, position_ids=None,
            #     unsqueeze_dim=1, rotary_dim=None): q (bsz, n_q_head, seq, head_dim),
            # cos/sin (seq, rotary_dim/2) here, since rotary_dim=head_dim is
            # passed; it rotates the underlying (bsz, seq, heads, hd) memory in place.
            def liger(s):
                cos = s["cos"].index_select(0, s["positions"])
                sin = s["sin"].index_select(0, s["positions"])
                q = s["q"].unsqueeze(0).transpose(1, 2)
                k = s["k"].unsqueeze(0).transpose(1, 2)
                return Fn.apply(q, k, cos, sin, None, 1, d)

            return Impl(fn=liger, outputs=outputs)
        if label == "flashinfer":
            rope = import_peer("flashinfer.rope")
            t = self.tokens

            # apply_rope_with_cos_sin_cache_inplace(positions, query, key, head_size,
            #     cos_sin_cache, is_neox=True) -> None; query (nnz, q_heads*head_size),
            # key (nnz, kv_heads*head_size), cache f32 (max_seq_len, rotary_dim)
            def fi(s):
                rope.apply_rope_with_cos_sin_cache_inplace(
                    s["positions"], s["q"].view(t, -1), s["k"].view(t, -1), d, s["cache"], is_neox=True
                )

            return Impl(fn=fi, outputs=outputs)
        raise Unavailable(f"no impl {label!r} for rope")
