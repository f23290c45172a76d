#!/usr/bin/env python3
"""Write nano-vllm's benchmark request set as a small binary file.

nano-vllm's bench.py draws, after random.seed(0), for each of 256 sequences
its prompt length (randint(100, 1024)) and prompt ids (randint(0, 10000)),
then all 256 output lengths (randint(100, 1024)); temperature 0.6,
ignore_eos. Totals: 142,827 prompt and 133,966 output tokens. Every engine
(ours in `workbench e2e`, and the peer scripts) reads this one file, so they
all run the same requests.

Format (little-endian): b"WBREQ1", u32 count, then per request
u16 prompt_len, u16 max_tokens, prompt_len x u16 token ids.
"""
import random
import struct
import sys

NUM_SEQS, MAX_IN, MAX_OUT = 256, 1024, 1024


def requests():
    random.seed(0)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, MAX_IN))] for _ in range(NUM_SEQS)]
    outputs = [random.randint(100, MAX_OUT) for _ in range(NUM_SEQS)]
    return prompts, outputs


def main(path):
    prompts, outputs = requests()
    assert sum(map(len, prompts)) == 142827 and sum(outputs) == 133966
    with open(path, "wb") as f:
        f.write(b"WBREQ1" + struct.pack("<I", NUM_SEQS))
        for p, o in zip(prompts, outputs):
            f.write(struct.pack("<HH", len(p), o))
            f.write(struct.pack(f"<{len(p)}H", *p))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "nanovllm-256.bin")
