#!/usr/bin/env python3
"""HF transformers' fastest batched generation on the e2e workload: the peer
row of `reports/<gpu>/e2e.csv`.

Runs the same requests as `workbench e2e` (benches/data/nanovllm-256.bin:
nano-vllm's benchmark, 256 sequences, 142,827 prompt and 133,966 output
tokens, temperature 0.6, ignore_eos) through transformers' continuous
batching (`init_continuous_batching`, attention "paged|sdpa" by default), each
request with its own max_new_tokens, on a random-weight model of a Qwen2
preset's exact shape (or a checkpoint directory), and appends one CSV row:

  engine,model,workload,num_seqs,prompt_tokens,output_tokens,seconds,
  output_tok_per_s,total_tok_per_s,ttft_p50_ms,tpot_p50_ms

  python3 benches/peers/hf_e2e.py --model qwen2-0.5b --out reports/h100/e2e.csv

Timing covers adding the requests to the last result (model load and the
manager's warm-up excluded). TTFT/TPOT come from transformers' per-token
timestamps when it records them, else they are left empty.
"""
import argparse
import csv
import os
import statistics
import struct
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WORKLOAD = os.path.join(HERE, "..", "data", "nanovllm-256.bin")

# (hidden, heads, kv_heads, head_dim, intermediate, layers, vocab, tie) — DESIGN.md's table.
PRESETS = {
    "qwen2-0.5b": (896, 14, 2, 64, 4864, 24, 151936, True),
    "qwen2-1.5b": (1536, 12, 2, 128, 8960, 28, 151936, True),
    "qwen2-7b": (3584, 28, 4, 128, 18944, 28, 152064, False),
}


def read_workload(path):
    """The binary format of benches/data/make_nanovllm_workload.py."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:6] != b"WBREQ1":
        sys.exit(f"{path}: not a workload file (bad magic)")
    (count,) = struct.unpack_from("<I", data, 6)
    at, reqs = 10, []
    for _ in range(count):
        n, max_tokens = struct.unpack_from("<HH", data, at)
        at += 4
        reqs.append((list(struct.unpack_from(f"<{n}H", data, at)), max_tokens))
        at += 2 * n
    if at != len(data):
        sys.exit(f"{path}: {len(data) - at} trailing bytes")
    return reqs


def build_model(args, torch, transformers):
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[args.dtype]
    if args.model in PRESETS:
        h, heads, kv, d, inter, layers, vocab, tie = PRESETS[args.model]
        cfg = transformers.Qwen2Config(
            hidden_size=h, num_attention_heads=heads, num_key_value_heads=kv, head_dim=d,
            intermediate_size=inter, num_hidden_layers=layers, vocab_size=vocab,
            tie_word_embeddings=tie, max_position_embeddings=32768, rms_norm_eps=1e-6,
            rope_theta=1e6, layer_types=["full_attention"] * layers, use_sliding_window=False,
        )
        torch.manual_seed(args.seed)
        with torch.device(args.device):
            model = transformers.Qwen2ForCausalLM(cfg).to(dtype)
        model.config._attn_implementation = args.attn
        name = f"{args.model} (random weights)"
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            args.model, dtype=dtype, attn_implementation=args.attn).to(args.device)
        name = args.model
    return model.eval(), name


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2-0.5b", help="a preset (%s) or a checkpoint directory" % ", ".join(PRESETS))
    p.add_argument("--workload", default=WORKLOAD)
    p.add_argument("--num-seqs", type=int, default=0, help="only the first N requests (0 = all)")
    p.add_argument("--out", default="e2e.csv", help="CSV to append the row to")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    p.add_argument("--attn", default="paged|sdpa")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import torch
    import transformers

    reqs = read_workload(args.workload)
    if args.num_seqs:
        reqs = reqs[: args.num_seqs]
    model, name = build_model(args, torch, transformers)
    gen = transformers.GenerationConfig(
        do_sample=args.temperature > 0, temperature=args.temperature or None,
        top_k=None, top_p=None, max_new_tokens=max(m for _, m in reqs),
        eos_token_id=None, pad_token_id=0,  # ignore_eos: nothing stops a request but its length
    )
    torch.manual_seed(args.seed)
    manager = model.init_continuous_batching(generation_config=gen)
    manager.start()
    try:
        t0 = time.perf_counter()
        ids = [manager.add_request(prompt, max_new_tokens=m, record_timestamps=True) for prompt, m in reqs]
        results, deadline = {}, time.monotonic() + 3600
        while len(results) < len(ids):
            r = manager.get_result(timeout=1)
            if r is not None and r.is_finished():
                results[r.request_id] = r
            elif r is None and not manager.is_running():
                sys.exit(f"transformers' generation thread stopped with {len(results)} of {len(ids)} requests done")
            if time.monotonic() > deadline:
                sys.exit("no result within an hour")
        seconds = time.perf_counter() - t0
    finally:
        manager.stop(block=True)

    prompt_tokens = sum(len(p) for p, _ in reqs)
    output_tokens = sum(len(r.generated_tokens) for r in results.values())
    expected = sum(m for _, m in reqs)
    if output_tokens != expected:
        print(f"warning: {output_tokens} output tokens, the workload asks for {expected}", file=sys.stderr)
    ttft, tpot = [], []
    for r in results.values():
        ts = getattr(r, "timestamps", None)
        created = getattr(r, "created_time", None)
        if ts and created is not None:
            ttft.append((ts[0] - created) * 1e3)
            if len(ts) > 1:
                tpot.append((ts[-1] - ts[0]) / (len(ts) - 1) * 1e3)
    row = {
        "engine": f"hf-transformers {transformers.__version__} continuous batching ({args.attn})",
        "model": name,
        "workload": os.path.basename(args.workload),
        "num_seqs": len(reqs),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "seconds": f"{seconds:.3f}",
        "output_tok_per_s": f"{output_tokens / seconds:.1f}",
        "total_tok_per_s": f"{(prompt_tokens + output_tokens) / seconds:.1f}",
        "ttft_p50_ms": f"{statistics.median(ttft):.1f}" if ttft else "",
        "tpot_p50_ms": f"{statistics.median(tpot):.2f}" if tpot else "",
    }
    new = not os.path.exists(args.out) or os.path.getsize(args.out) == 0
    with open(args.out, "a", newline="") as f:
        # "\n" rows like the engine's own (csv defaults to "\r\n").
        w = csv.DictWriter(f, fieldnames=list(row), lineterminator="\n")
        if new:
            w.writeheader()
        w.writerow(row)
    print(", ".join(f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
