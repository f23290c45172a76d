#!/usr/bin/env python3
"""Write a tiny Qwen2-style tokenizer for the tiny golden model (vocab 256).

Writes tests/golden/qwen2-tiny/tokenizer.json and tokenizer_config.json:

- tokenizer.json: Qwen2's layout (NFC normalizer, Qwen2's split regex, then
  byte-level, byte-level decoder) with a BPE model that has NO merges, so
  every byte is one token. Ids 0..=252 are the byte-level characters of bytes
  0..=252 in byte order (id b <-> byte b); 253, 254, 255 are the special
  tokens <|endoftext|>, <|im_start|>, <|im_end|>. Bytes 0xFD..0xFF never
  occur in valid UTF-8, so every UTF-8 text still encodes, one id per byte,
  and golden.json's token ids decode to the bytes of the same value.
- tokenizer_config.json: Qwen2-Instruct's (ChatML chat template with its
  default system prompt, eos_token <|im_end|>, pad_token <|endoftext|>).

Needs only the `tokenizers` package; the output is deterministic
(re-running it gives byte-identical files):

    python3 -m venv /tmp/tokenv && /tmp/tokenv/bin/pip install tokenizers
    /tmp/tokenv/bin/python tests/golden/make_tiny_tokenizer.py
"""

import json
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models
from tokenizers import normalizers, pre_tokenizers, processors

OUT = Path(__file__).resolve().parent / "qwen2-tiny"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 253, 254, 255
NUM_BYTES = 253  # bytes 0..=252 get ids 0..=252

# Qwen2's pre-tokenizer regex (Qwen/Qwen2-0.5B-Instruct tokenizer.json); its
# `\s+(?!\S)` look-ahead is what needs fancy-regex (or oniguruma) in Rust.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Qwen2-Instruct's chat template, verbatim.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def bytes_to_unicode():
    """GPT-2's byte -> printable character map, the one ByteLevel uses."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def build():
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(NUM_BYTES)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [
            AddedToken(s, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
            for s in SPECIALS
        ]
    )
    # The Python ByteLevel decoder takes no options and serializes its
    # defaults; set Qwen2's (unused when decoding, but the file then reads
    # like Qwen2's own).
    doc = json.loads(tok.to_str())
    doc["decoder"].update(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return Tokenizer.from_str(json.dumps(doc))


def check(tok):
    assert tok.get_vocab_size(with_added_tokens=True) == 256
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == NUM_BYTES + i, (s, tok.token_to_id(s))
    text = "héllo, wörld!\n  \t€ 12 <|im_end|>"
    ids = tok.encode(text, add_special_tokens=False).ids
    raw = text.replace("<|im_end|>", "").encode()
    assert ids == list(raw) + [255], ids
    assert tok.decode(ids, skip_special_tokens=True) == text.replace("<|im_end|>", "")
    assert tok.decode(ids, skip_special_tokens=False) == text
    # Every byte id decodes to its byte (lone bytes >= 0x80 are invalid UTF-8,
    # so check them through the byte-level alphabet instead).
    b2u = bytes_to_unicode()
    for b in range(NUM_BYTES):
        assert tok.id_to_token(b) == b2u[b]


def main():
    tok = build()
    check(tok)
    OUT.mkdir(parents=True, exist_ok=True)
    tok.save(str(OUT / "tokenizer.json"), pretty=True)
    # Reload the saved file: it must behave the same.
    check(Tokenizer.from_file(str(OUT / "tokenizer.json")))

    added = {
        str(NUM_BYTES + i): {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, s in enumerate(SPECIALS)
    }
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 128,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    with open(OUT / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    print(f"tokenizers {tokenizers.__version__}: wrote {OUT}/tokenizer.json, tokenizer_config.json")


if __name__ == "__main__":
    main()
