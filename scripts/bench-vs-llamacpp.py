#!/usr/bin/env python3
"""Hearth vs llama.cpp on the same GGUF, same thread count, interleaved in one run.

For each repetition: `hearth bench -r 1` (pp and tg), then llama.cpp (through
llama-cpp-python) doing the same work: ppN = one batch of N random tokens on an empty
context; tgN = N single-token decode steps from an empty context. Prints a markdown
table with mean ± sd per side and the per-repetition ratio hearth/llama.cpp
(min / median / max).

With -d D, the pp and tg tests start from D random tokens already in the context
(llama-bench's -d; prefilled untimed before each repetition, on both sides).

With -b B (default 16), also batched generation: B sequences decoding together, N steps
of one token each from empty contexts, aggregate tokens/s. Ours: `hearth bench -b B`
(one batched forward pass per step); theirs: llama.cpp's batch API (one `llama_decode`
of B tokens with B sequence ids per step, through llama-cpp-python's bindings).

Usage: scripts/bench-vs-llamacpp [-m MODEL] [-p 512] [-n 128] [-b 16] [-d 0] [-r 5] [-t 2]
"""
import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import time

import llama_cpp
from llama_cpp import Llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def at_depth(args):
    """The suffix of the pp and tg tests' names: ` @ dD` with context in place."""
    return f" @ d{args.d}" if args.d > 0 else ""


def hearth_once(args):
    out = subprocess.run(
        [args.hearth, "bench", "-m", args.model, "-p", str(args.p), "-n", str(args.n),
         "-b", str(args.b), "-d", str(args.d), "-r", "1", "-t", str(args.t), "-o", "json",
         "--arithmetic", args.arithmetic],
        check=True, capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    return {r["test"]: r["mean_tps"] for r in rows}


def llama_once(llm, args, rng):
    vocab = llm.n_vocab()
    res = {}
    at = at_depth(args)
    context = [rng.randrange(vocab) for _ in range(args.d)]
    toks = [rng.randrange(vocab) for _ in range(args.p)]
    llm.reset()
    if context:
        llm.eval(context)
    t = time.perf_counter()
    llm.eval(toks)
    res[f"pp{args.p}{at}"] = args.p / (time.perf_counter() - t)
    toks = [rng.randrange(vocab) for _ in range(args.n)]
    llm.reset()
    if context:
        llm.eval(context)
    t = time.perf_counter()
    for tok in toks:
        llm.eval([tok])
    res[f"tg{args.n}{at}"] = args.n / (time.perf_counter() - t)
    if args.b > 0:
        res[f"tg{args.n} b{args.b}"] = llama_batched(llm, args, rng)
    return res


def llama_batched(llm, args, rng):
    """B sequences, N decode steps of one token each, one llama_decode per step."""
    b, n = args.b, args.n
    p = llama_cpp.llama_context_default_params()
    p.n_ctx = (b * (n + 16) + 255) // 256 * 256
    p.n_batch = max(b, 512)
    p.n_ubatch = max(b, 512)
    p.n_seq_max = b
    p.n_threads = args.t
    p.n_threads_batch = args.t
    ctx = llama_cpp.llama_init_from_model(llm._model.model, p)
    batch = llama_cpp.llama_batch_init(b, 0, 1)
    vocab = llm.n_vocab()
    steps = [[rng.randrange(vocab) for _ in range(b)] for _ in range(n)]
    try:
        t = time.perf_counter()
        for pos, toks in enumerate(steps):
            batch.n_tokens = b
            for s, tok in enumerate(toks):
                batch.token[s] = tok
                batch.pos[s] = pos
                batch.n_seq_id[s] = 1
                batch.seq_id[s][0] = s
                batch.logits[s] = 1
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
        return b * n / (time.perf_counter() - t)
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-b", type=int, default=16)
    ap.add_argument("-d", type=int, default=0, help="tokens already in the context for pp and tg")
    ap.add_argument("-r", type=int, default=5)
    ap.add_argument("-t", type=int, default=2)
    ap.add_argument("--arithmetic", default="lanes", choices=["lanes", "blocks"],
                    help="hearth's --arithmetic: lanes (llama.cpp's, bit for bit) or blocks")
    ap.add_argument("--hearth", default=os.path.join(ROOT, "target", "release", "hearth"))
    args = ap.parse_args()

    llm = Llama(model_path=args.model, n_ctx=args.d + args.p + args.n + 16, n_batch=args.p, n_ubatch=args.p,
                n_threads=args.t, n_threads_batch=args.t, verbose=False)
    rng = random.Random(42)
    llama_once(llm, args, rng)  # warm-up
    ours, theirs = [], []
    for _ in range(args.r):
        ours.append(hearth_once(args))
        theirs.append(llama_once(llm, args, rng))

    print(f"CPU: {cpu_model()}; threads: {args.t}; model: {os.path.basename(args.model)}; "
          f"repetitions: {args.r} (interleaved); hearth --arithmetic {args.arithmetic}")
    print()
    print("| test | hearth t/s | llama.cpp t/s | ratio min | ratio median | ratio max |")
    print("| ---- | ---------: | ------------: | --------: | -----------: | --------: |")
    at = at_depth(args)
    tests = [f"pp{args.p}{at}", f"tg{args.n}{at}"] + ([f"tg{args.n} b{args.b}"] if args.b > 0 else [])
    for test in tests:
        a = [o[test] for o in ours]
        b = [t[test] for t in theirs]
        ratios = sorted(x / y for x, y in zip(a, b))
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
        print(f"| {test} | {statistics.mean(a):.1f} ± {sd(a):.1f} | {statistics.mean(b):.1f} ± {sd(b):.1f} "
              f"| {ratios[0]:.2f} | {statistics.median(ratios):.2f} | {ratios[-1]:.2f} |")
    if args.b > 0 and args.d == 0:
        single = statistics.mean(o[f"tg{args.n}"] for o in ours)
        batched = statistics.mean(o[f"tg{args.n} b{args.b}"] for o in ours)
        single_l = statistics.mean(t[f"tg{args.n}"] for t in theirs)
        batched_l = statistics.mean(t[f"tg{args.n} b{args.b}"] for t in theirs)
        print()
        print(f"batched / single stream: hearth {batched / single:.2f}x, llama.cpp {batched_l / single_l:.2f}x")


if __name__ == "__main__":
    main()
