#!/usr/bin/env python3
"""HF transformers' side of the greedy parity check at a Qwen2 preset's shapes.

Builds a random Qwen2ForCausalLM of a preset's exact shape with transformers
(HF's own initialization, torch.manual_seed(SEED)), saves it as a checkpoint
directory (config.json + model.safetensors, in the chosen dtype), and writes
golden.json there: for fixed prompts, HF's greedy continuation and its top-k
log-probabilities at every step, computed on the GPU in that dtype.
`workbench parity --model DIR --golden DIR/golden.json` then loads the same
checkpoint into the engine, generates greedily and applies vLLM's rule (at the
first divergence each side's token is in the other's top k).

    python3 benches/peers/hf_parity.py --preset qwen2-0.5b --out /tmp/parity-0.5b

The checkpoint (about 1 GB at 0.5B in bf16) is for the run only; commit the
report `workbench parity` writes, not this directory.
"""
import argparse
import json
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from hf_e2e import PRESETS  # noqa: E402  (one table of preset shapes)

SCHEMA_VERSION = 1


def prompts(vocab, count, seed):
    """Fixed random prompts: lengths 1, then spread up to 512 tokens."""
    rng = random.Random(seed)
    lens = [1, 7, 33, 100, 257, 512, 64, 16][:count]
    return [[rng.randrange(vocab) for _ in range(n)] for n in lens]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="qwen2-0.5b", choices=sorted(PRESETS))
    ap.add_argument("--out", required=True, help="directory for the checkpoint and golden.json")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attn", default="sdpa", help="HF attention implementation")
    args = ap.parse_args()

    import safetensors
    import torch
    import transformers

    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[args.dtype]
    h, heads, kv, d, inter, layers, vocab, tie = PRESETS[args.preset]
    cfg = transformers.Qwen2Config(
        hidden_size=h, num_attention_heads=heads, num_key_value_heads=kv, head_dim=d,
        intermediate_size=inter, num_hidden_layers=layers, vocab_size=vocab,
        tie_word_embeddings=tie, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_theta=1e6, layer_types=["full_attention"] * layers, use_sliding_window=False,
    )
    torch.manual_seed(args.seed)
    t0 = time.time()
    with torch.device("cuda"):
        model = transformers.Qwen2ForCausalLM(cfg).to(dtype).eval()
    model.config._attn_implementation = args.attn
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    # transformers >= 5 writes the RoPE base only under rope_parameters; add the
    # top-level key released Qwen2 checkpoints carry (the engine reads either).
    cpath = os.path.join(args.out, "config.json")
    with open(cpath) as f:
        saved = json.load(f)
    saved.setdefault("rope_theta", 1e6)
    with open(cpath, "w") as f:
        json.dump(saved, f, indent=2)
    print(f"built and saved {args.preset} ({args.dtype}) in {time.time() - t0:.1f} s -> {args.out}")

    cases = []
    for p in prompts(vocab, args.prompts, args.seed):
        ids = torch.tensor([p], device="cuda")
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=args.new_tokens, do_sample=False, output_logits=True,
                return_dict_in_generate=True, pad_token_id=0, eos_token_id=None,
            )
        steps = []
        gen = out.sequences[0, len(p):].tolist()
        for tok, logits in zip(gen, out.logits):  # one [1, vocab] per generated token, raw
            lp = torch.log_softmax(logits[0].float(), dim=-1)
            v, i = torch.topk(lp, args.top_k)
            top = [[int(a), float(b)] for a, b in zip(i.tolist(), v.tolist())]
            # bf16 logits tie often; generate's pick may be any of the tied best.
            assert float(lp[tok]) == top[0][1], "generate's token is not a best logit"
            if top[0][0] != tok:
                j = next((j for j, e in enumerate(top) if e[0] == tok), None)
                if j is None:
                    top[-1] = [tok, float(lp[tok])]
                    j = len(top) - 1
                top.insert(0, top.pop(j))
            steps.append({"token": tok, "top": top})
        cases.append({"prompt": p, "steps": steps})
        ties = sum(s["top"][0][1] == s["top"][1][1] for s in steps)
        print(f"prompt of {len(p):4} tokens: {len(steps)} greedy tokens, {ties} of them tied "
              f"with the runner-up (bf16 logits)")

    golden = {
        "schema_version": SCHEMA_VERSION,
        "generator": "benches/peers/hf_parity.py",
        "model": f"{args.preset} shapes, transformers' random init, torch.manual_seed({args.seed})",
        "dtype": str(dtype).replace("torch.", ""),
        "attn": args.attn,
        "top_k": args.top_k,
        "versions": {
            "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0),
        },
        "cases": cases,
    }
    with open(os.path.join(args.out, "golden.json"), "w") as f:
        json.dump(golden, f)
    print(f"wrote {os.path.join(args.out, 'golden.json')}: {len(cases)} prompts")


if __name__ == "__main__":
    main()
