#!/usr/bin/env python3
"""Generate the tiny-Qwen2 golden that tests/hf_parity.rs checks the CPU reference against.

Builds a small random Qwen2ForCausalLM with Hugging Face transformers (f32, eager
attention), saves it as config.json + model.safetensors, and writes golden.json:
the full f32 logits of one forward pass for a few fixed prompts and HF's greedy
continuation of each.

Usage (needs torch, transformers, safetensors; no network at run time):

    python3 tests/golden/make_qwen2_golden.py [OUT_DIR]

OUT_DIR defaults to tests/golden/qwen2-tiny next to this script. The output is
deterministic for a given torch/transformers version (torch.manual_seed(0), CPU).
"""

import json
import math
import os
import sys

import torch
import transformers
from transformers import Qwen2Config, Qwen2ForCausalLM

SCHEMA_VERSION = 1
SEED = 0
WEIGHT_STD = 0.15  # large enough that logits are far from uniform
BIAS_STD = 0.1
NORM_STD = 0.1  # norm weights are 1 + N(0, NORM_STD)
NEW_TOKENS = 8
# Fixed prompts of lengths 1, 5 and 17 (ids < vocab_size).
PROMPTS = [
    [7],
    [1, 42, 100, 255, 3],
    [12, 200, 33, 33, 7, 91, 150, 0, 64, 128, 17, 250, 5, 99, 180, 2, 77],
]
# Greedy tokens whose top-1/top-2 logit margin is below this are ambiguous
# between f32 and f64 arithmetic; the generator refuses such a golden.
MIN_MARGIN = 1e-3


def sig7(x: float) -> float:
    """Round to 7 significant digits (enough to carry an f32 to ~1e-7 relative)."""
    return float(f"{x:.7g}")


def build_model() -> Qwen2ForCausalLM:
    cfg = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=256,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=None,  # no early stop: generate exactly NEW_TOKENS
        pad_token_id=None,
        torch_dtype=torch.float32,
        attn_implementation="eager",
    )
    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM(cfg).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + NORM_STD * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0.0, BIAS_STD)
            else:
                p.normal_(0.0, WEIGHT_STD)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


@torch.no_grad()
def run(model, prompt):
    ids = torch.tensor([prompt], dtype=torch.long)
    logits = model(input_ids=ids).logits[0].to(torch.float32)  # [len, vocab]
    gen = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=0,
        pad_token_id=0,
        eos_token_id=None,
        output_scores=True,
        return_dict_in_generate=True,
    )
    new = gen.sequences[0, len(prompt):].tolist()
    assert len(new) == NEW_TOKENS, new
    margins = []
    for s in gen.scores:
        top = torch.topk(s[0], 2).values
        margins.append(float(top[0] - top[1]))
    return logits, new, margins


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "qwen2-tiny")
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(1)

    model = build_model()
    model.save_pretrained(out, safe_serialization=True)

    # transformers >= 5 writes the RoPE base only as rope_parameters.rope_theta;
    # workbench::engine::config requires the top-level `rope_theta` that every
    # released Qwen2 config.json (written by transformers 4.x) has. Add it
    # (same value), and check below that HF reloads the patched file to the
    # same logits.
    cfg_path = os.path.join(out, "config.json")
    with open(cfg_path) as f:
        cfg_json = json.load(f)
    patches = []
    if "rope_theta" not in cfg_json:
        theta = cfg_json.get("rope_parameters", {}).get("rope_theta")
        assert theta is not None, cfg_json
        cfg_json["rope_theta"] = theta
        patches.append("added top-level rope_theta (copied from rope_parameters.rope_theta)")
        with open(cfg_path, "w") as f:
            json.dump(cfg_json, f, indent=2, sort_keys=True)
            f.write("\n")

    reloaded = Qwen2ForCausalLM.from_pretrained(
        out, torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()

    cases = []
    for prompt in PROMPTS:
        logits, new, margins = run(model, prompt)
        logits2, new2, _ = run(reloaded, prompt)
        assert torch.equal(logits, logits2), "reloaded model disagrees with the saved one"
        assert new == new2
        assert min(margins) > MIN_MARGIN, f"greedy near-tie for {prompt}: {margins}"
        std = float(logits.std())
        assert std > 0.5, f"logits too flat (std {std})"
        cases.append(
            {
                "prompt": prompt,
                "logits_shape": list(logits.shape),
                "logits": [[sig7(v) for v in row] for row in logits.tolist()],
                "greedy": new,
                "greedy_min_margin": sig7(min(margins)),
            }
        )
        print(f"prompt len {len(prompt)}: logits std {std:.3f}, greedy {new}, "
              f"min margin {min(margins):.4f}")

    golden = {
        "schema_version": SCHEMA_VERSION,
        "generator": "tests/golden/make_qwen2_golden.py",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "seed": SEED,
        "weight_std": WEIGHT_STD,
        "bias_std": BIAS_STD,
        "norm_std": NORM_STD,
        "attn_implementation": "eager",
        "dtype": "float32",
        "config_patches": patches,
        "max_new_tokens": NEW_TOKENS,
        "cases": cases,
    }
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump(golden, f, separators=(",", ":"))
        f.write("\n")

    total = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out))
    print(f"wrote {out} ({total} bytes): {sorted(os.listdir(out))}")
    assert total < 2 * 1024 * 1024
    assert not any(math.isnan(v) for c in cases for r in c["logits"] for v in r)


if __name__ == "__main__":
    main()
