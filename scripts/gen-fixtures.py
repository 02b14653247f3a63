#!/usr/bin/env python3
"""Records llama.cpp's behaviour on the default model as test fixtures.

Runs llama.cpp through llama-cpp-python (its tokenizer and decoder are llama.cpp's) and
writes, under tests/fixtures/:
  - tokenizer-smollm2.json: token ids for a set of strings (special tokens parsed, no BOS),
    and llama.cpp's detokenization of them;
  - greedy-smollm2.json: 64-token greedy continuations (argmax of the logits, not stopping
    at end-of-turn tokens) for raw prompts and chat prompts, with the top-2 logit margin at
    every step so a near-tie can be told from a bug.

Usage: scripts/gen-fixtures [--python PY]  (the wrapper installs llama-cpp-python in .venv)
"""
import json
import os
import sys

import jinja2
import numpy as np
from llama_cpp import Llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
OUT = os.path.join(ROOT, "tests", "fixtures")

TOKENIZER_CASES = [
    "Hello, world!",
    "hello world",
    " leading space",
    "trailing space ",
    "  two leading spaces",
    "double  space inside",
    "line one\nline two",
    "\n\nblank lines\n\n\n",
    "tab\tseparated\tvalues",
    "\t\tindented with tabs",
    "def add(a, b):\n    return a + b\n",
    "for (int i = 0; i < 10; ++i) { sum += i; }",
    "fn main() { println!(\"{}\", 42); }",
    "3.14159 is pi; 1234567890 and 007",
    "The year 2024 had 366 days.",
    "Price: $1,299.99 (-15%)",
    "emoji: 😀🎉👍🏽 and ❤️",
    "🦀 Rust 🦀",
    "日本語のテキストです。",
    "中文测试：你好，世界！",
    "한국어 문장입니다.",
    "café naïve résumé façade",
    "Ünïcödé àccénts: ÀÉÎÕÜ ñ ç ø å",
    "Привет, мир!",
    "مرحبا بالعالم",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text before <|im_end|> text after",
    "<|endoftext|>",
    "I'm sure you'll see they've done it, we'd say.",
    "URL: https://example.com/path?q=1&r=two#frag",
    "email@example.org, @mention #hashtag",
    "   ",
    "a",
    "ALL CAPS SENTENCE WITH NUMBERS 42",
    "mixedCase_identifier and snake_case_name",
    "JSON: {\"key\": [1, 2, {\"nested\": null}]}",
    "Quotes: \"double\" 'single' `back`",
    "Math: ∑ x² + √y ≠ ∞",
    "zero\u200bwidth and non\u00a0breaking",
]

RAW_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
]

CHAT_PROMPTS = [
    [{"role": "user", "content": "What is the capital of Germany?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "List three colors."}],
    [{"role": "user", "content": "Write a haiku about autumn."}],
]

STEPS = 64

# Pre-tokenizer families to check on SmolLM2's vocab by swapping `tokenizer.ggml.pre`.
PRE_VARIANTS = ["smollm", "llama-bpe", "qwen2", "gpt-2", "falcon", "default"]


def gguf_header_with_pre(path, pre, out):
    """Writes a tensor-less copy of the GGUF's metadata with `tokenizer.ggml.pre` replaced
    (enough for llama.cpp's vocab_only loading)."""
    import struct
    with open(path, "rb") as f:
        data = f.read(16 << 20)
    magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", data, 0)
    assert magic == b"GGUF"
    pos = 24
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def skip_value(pos, ty):
        if ty in sizes:
            return pos + sizes[ty]
        if ty == 8:
            (n,) = struct.unpack_from("<Q", data, pos)
            return pos + 8 + n
        if ty == 9:
            ety, n = struct.unpack_from("<IQ", data, pos)
            pos += 12
            if ety in sizes:
                return pos + n * sizes[ety]
            for _ in range(n):
                pos = skip_value(pos, ety)
            return pos
        raise ValueError(ty)

    kvs = []
    for _ in range(n_kv):
        start = pos
        (klen,) = struct.unpack_from("<Q", data, pos)
        key = data[pos + 8:pos + 8 + klen].decode()
        pos += 8 + klen
        (ty,) = struct.unpack_from("<I", data, pos)
        pos = skip_value(pos + 4, ty)
        if key == "tokenizer.ggml.pre":
            b = pre.encode()
            kvs.append(struct.pack("<Q", klen) + key.encode() + struct.pack("<IQ", 8, len(b)) + b)
        else:
            kvs.append(data[start:pos])
    with open(out, "wb") as f:
        f.write(struct.pack("<4sIQQ", b"GGUF", version, 0, len(kvs)))
        for kv in kvs:
            f.write(kv)


def render_chat(llm, messages):
    src = llm.metadata["tokenizer.chat_template"]
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(src).render(messages=messages, add_generation_prompt=True)


def last_logits(llm):
    # Only the last position of each batch has logits (logits_all is off); llama.cpp
    # returns them as the first output row.
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).astype(np.float32)


def greedy(llm, prompt_ids):
    llm.reset()
    llm.eval(prompt_ids)
    out, margins = [], []
    for _ in range(STEPS):
        logits = last_logits(llm)
        top2 = np.argsort(-logits, kind="stable")[:2]
        tok = int(top2[0])
        out.append(tok)
        margins.append(float(logits[top2[0]] - logits[top2[1]]))
        llm.eval([tok])
    return out, margins


def main():
    llm = Llama(model_path=MODEL, n_ctx=2048, n_threads=2, n_batch=512, seed=0,
                verbose=False)
    tok_cases = []
    for text in TOKENIZER_CASES:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        back = llm.detokenize(ids, special=True).decode("utf-8", errors="replace")
        tok_cases.append({"text": text, "ids": ids, "detokenized": back})
    pre_ids = {}
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        for pre in PRE_VARIANTS:
            path = os.path.join(tmp, f"vocab-{pre}.gguf")
            gguf_header_with_pre(MODEL, pre, path)
            voc = Llama(model_path=path, vocab_only=True, verbose=False)
            pre_ids[pre] = [voc.tokenize(t.encode("utf-8"), add_bos=False, special=True)
                            for t in TOKENIZER_CASES]
            del voc
    with open(os.path.join(OUT, "tokenizer-smollm2.json"), "w", encoding="utf-8") as f:
        json.dump({"generator": "scripts/gen-fixtures.py", "llama_cpp_python": __import__("llama_cpp").__version__,
                   "model": os.path.basename(MODEL), "cases": tok_cases,
                   "pre_variants": {"note": "ids for each case with tokenizer.ggml.pre swapped on the same vocab",
                                    "ids": pre_ids}}, f, ensure_ascii=False, indent=1)

    cases = []
    for p in RAW_PROMPTS:
        ids = llm.tokenize(p.encode("utf-8"), add_bos=True, special=True)
        out, margins = greedy(llm, ids)
        cases.append({"kind": "raw", "prompt": p, "prompt_ids": ids, "greedy_ids": out,
                      "top2_margin": margins})
    for msgs in CHAT_PROMPTS:
        text = render_chat(llm, msgs)
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        out, margins = greedy(llm, ids)
        cases.append({"kind": "chat", "messages": msgs, "rendered": text, "prompt_ids": ids,
                      "greedy_ids": out, "top2_margin": margins})
    with open(os.path.join(OUT, "greedy-smollm2.json"), "w", encoding="utf-8") as f:
        json.dump({"generator": "scripts/gen-fixtures.py", "llama_cpp_python": __import__("llama_cpp").__version__,
                   "model": os.path.basename(MODEL), "steps": STEPS, "cases": cases}, f,
                  ensure_ascii=False, indent=1)
    print(f"wrote {len(tok_cases)} tokenizer cases and {len(cases)} greedy cases to {OUT}")


if __name__ == "__main__":
    sys.exit(main())
