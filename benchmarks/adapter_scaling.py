"""Throughput as the number of distinct adapters grows (S-LoRA's experiment), and the
cold-load latency of an adapter from disk to its first token.

Throughput: for 1, 8, 32, 128 and 512 adapters (rank 16, all seven projections) with
max_loras=32 and max_cpu_loras=128, under uniform and Zipf(1.5) popularity, all
requests submitted at once. The 8-adapter run is the reference for the 512 bar.
Adapters are registered in the durable store under distinct names; their weights come
from a pool of 16 random files (the store shares identical blobs), so every name is a
separate record that must be read, validated and copied into a slot on its own.

Cold load: one request on an idle engine for an adapter that is in no tier yet, timed
from submission to its first token, for ranks 8, 16 and 64 (p50/p99).

    python -m benchmarks.adapter_scaling                   # table + plot into benchmarks/
    python -m benchmarks.adapter_scaling --counts 1,8,32 --num-requests 64
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

from loraserve import LLM, SamplingParams
from loraserve.model.loader import load_config, resolve_model

from .synthetic import random_prompts, write_adapter

POOL = 16


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.adapter_scaling",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--counts", default="1,8,32,128,512", help="numbers of distinct adapters")
    p.add_argument("--num-requests", type=int, default=256, help="requests per throughput run")
    p.add_argument("--gen-tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--max-loras", type=int, default=32, help="device adapter slots")
    p.add_argument("--max-cpu-loras", type=int, default=128, help="adapters kept in CPU memory")
    p.add_argument("--zipf", type=float, default=1.5, help="Zipf exponent of the skewed popularity")
    p.add_argument("--cold-samples", type=int, default=20, help="cold loads timed per rank")
    p.add_argument("--dtype", default="bfloat16", help="engine dtype")
    p.add_argument("--cold-only", action="store_true", help="measure only the cold-load latencies")
    p.add_argument("--plot", default=os.path.join(os.path.dirname(__file__), "adapter_scaling.png"),
                   help="where to write the PNG plot ('' to skip)")
    return p.parse_args(argv)


def popularity(n: int, num_requests: int, kind: str, alpha: float, rng: random.Random) -> list[int]:
    if kind == "uniform":
        return [rng.randrange(n) for _ in range(num_requests)]
    weights = [1.0 / (i + 1) ** alpha for i in range(n)]
    return rng.choices(range(n), weights=weights, k=num_requests)


def throughput(args, pool: list[str], n: int, kind: str, hf_config) -> float:
    with tempfile.TemporaryDirectory() as store:
        llm = LLM(dtype=args.dtype, max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras,
                  max_lora_rank=16, max_num_seqs=128, adapter_dir=store)
        for i in range(n):
            llm.add_adapter(f"a{i}", pool[i % len(pool)])
        rng = random.Random(n)
        choice = popularity(n, args.num_requests, kind, args.zipf, rng)
        prompts = random_prompts(args.num_requests, 32, 96, hf_config.vocab_size, seed=n)
        params = SamplingParams(max_tokens=args.gen_tokens, temperature=0, ignore_eos=True)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, adapters=[f"a{c}" for c in choice], use_tqdm=False)
        return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)


def cold_loads(args, tmp: str, hf_config, rank: int) -> list[float]:
    llm = LLM(dtype=args.dtype, max_loras=4, max_cpu_loras=4, max_lora_rank=64,
              adapter_dir=os.path.join(tmp, f"cold-store-{rank}"))
    engine = llm.engine
    path = write_adapter(os.path.join(tmp, f"cold-r{rank}"), hf_config, "SmolLM2-135M-Instruct", rank, seed=rank)
    llm.generate(["warm up"], SamplingParams(max_tokens=2), use_tqdm=False)
    latencies = []
    for i in range(args.cold_samples):
        llm.add_adapter(f"cold{i}", path)             # a new record: in no tier yet
        start = time.perf_counter()
        rid = engine.add_request("Hello there", SamplingParams(max_tokens=1, ignore_eos=True), f"cold{i}")
        while not any(o.request_id == rid for o in engine.step().outputs):
            pass
        latencies.append(time.perf_counter() - start)
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def plot(path: str, counts: list[int], table: dict, args) -> None:
    try:
        import matplotlib
    except ImportError:     # the table above is the result; the plot is the `bench` extra's
        print("no plot: matplotlib is not installed (pip install matplotlib, or the project's [bench] extra)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in ("uniform", "zipf"):
        ax.plot(counts, [table[(n, kind)] for n in counts], marker="o", label=kind)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("distinct adapters")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"loraserve throughput vs distinct adapters\n(max_loras={args.max_loras}, max_cpu_loras={args.max_cpu_loras})")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    args = parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    hf_config = load_config(resolve_model(None).local_dir)
    with tempfile.TemporaryDirectory() as tmp:
        pool = [write_adapter(os.path.join(tmp, f"pool{i}"), hf_config, "SmolLM2-135M-Instruct", 16, seed=i)
                for i in range(POOL)]
        print(f"{args.num_requests} requests x {args.gen_tokens} tokens, max_loras={args.max_loras}, "
              f"max_cpu_loras={args.max_cpu_loras}, {args.dtype}")
        print(f"{'adapters':>8} {'uniform tok/s':>14} {'zipf tok/s':>11}")
        table = {}
        for n in [] if args.cold_only else counts:
            for kind in ("uniform", "zipf"):
                table[(n, kind)] = throughput(args, pool, n, kind, hf_config)
            print(f"{n:>8} {table[(n, 'uniform')]:>14.1f} {table[(n, 'zipf')]:>11.1f}", flush=True)
        if table and 8 in counts and 512 in counts:
            print(f"512 vs 8 adapters under Zipf: {table[(512, 'zipf')] / table[(8, 'zipf')]:.2f}x")
        print(f"{'rank':>4} {'cold load p50 ms':>17} {'p99 ms':>8}")
        for rank in (8, 16, 64):
            lat = cold_loads(args, tmp, hf_config, rank)
            print(f"{rank:>4} {statistics.median(lat) * 1e3:>17.1f} {percentile(lat, 0.99) * 1e3:>8.1f}", flush=True)
        if args.plot and table:
            plot(args.plot, counts, table, args)
            print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
