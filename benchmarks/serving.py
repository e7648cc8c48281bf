"""Online serving benchmark: Poisson arrivals at several rates against a live server,
each request naming one of N adapters drawn from a Zipf distribution.

    python -m benchmarks.serving                         # starts `loraserve serve` itself
    python -m benchmarks.serving --url http://127.0.0.1:8000 --api-key KEY
    python -m benchmarks.serving --rates 1,2,4,8 --requests 64 --max-tokens 64 --write

Every request streams (/v1/completions, token-id prompts, greedy, ignore_eos, fixed
max_tokens). Reported per rate: request and output-token throughput, TTFT and
inter-token latency (gaps between streamed chunks, one token each here) p50/p99, and
the share of requests whose TTFT meets the SLO (a failed request never does). With
--write the table goes into benchmarks/RESULTS.md (between serving markers, replacing
the last run) and the latency-vs-rate plot into benchmarks/serving_latency.png
(needs matplotlib: pip install -e ".[bench]").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field

import httpx

from .results_md import write_section
from .serve_process import start_server, stop_server
from .synthetic import random_prompts, write_adapter

HERE = os.path.dirname(os.path.abspath(__file__))



@dataclass
class Result:
    ok: bool
    ttft: float = float("nan")
    e2e: float = float("nan")
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str = ""


def zipf_weights(n: int, s: float) -> list[float]:
    w = [1.0 / (k ** s) for k in range(1, n + 1)]
    total = sum(w)
    return [x / total for x in w]


def percentile(values: list[float], q: float) -> float:
    values = sorted(v for v in values if v == v)
    if not values:
        return float("nan")
    i = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[i]


# -- the server --------------------------------------------------------------------------

def start_lora_server(args, store_dir: str):
    serve_args = ["--adapter-dir", store_dir, "--max-loras", str(args.max_loras), "--max-lora-rank",
                  str(max(16, args.rank)), "--log-level", "warning"]
    serve_args += (["--model", args.model] if args.model else []) + shlex.split(args.serve_args)
    return start_server(serve_args)


def register_adapters(client: httpx.Client, args, base_id: str, work: str) -> tuple[list[str], int]:
    """N synthetic rank-r adapters on all seven projections, uploaded over HTTP; and the vocab size."""
    from transformers import AutoConfig

    from loraserve.model.loader import resolve_model

    hf_config = AutoConfig.from_pretrained(resolve_model(args.model).local_dir)
    names = []
    for i in range(args.adapters):
        name = f"bench-{i:03d}"
        path = write_adapter(os.path.join(work, name), hf_config, base_id, args.rank, seed=1000 + i)
        with open(os.path.join(path, "adapter_config.json"), "rb") as c, \
                open(os.path.join(path, "adapter_model.safetensors"), "rb") as w:
            r = client.post("/v1/adapters", data={"name": name},
                            files={"adapter_config": ("adapter_config.json", c.read()),
                                   "adapter_model": ("adapter_model.safetensors", w.read())})
        r.raise_for_status()
        names.append(name)
    return names, hf_config.vocab_size


# -- the load ------------------------------------------------------------------------------

async def one_request(client: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    result = Result(ok=False)
    last = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                result.error = f"{r.status_code}: {r.text[:200]}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                    return result
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.tokens = chunk["usage"]["completion_tokens"]
                if not chunk["choices"]:
                    continue
                if last is None:
                    result.ttft = now - start
                else:
                    result.gaps.append(now - last)
                last = now
        result.e2e = time.perf_counter() - start
        result.ok = result.tokens == max_tokens
        if not result.ok:
            result.error = f"got {result.tokens} of {max_tokens} tokens"
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


async def run_rate(url: str, headers: dict, rate: float, jobs: list[tuple[str, list[int]]], max_tokens: int,
                   seed: int) -> tuple[list[Result], float]:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as client:
        tasks = []
        start = time.perf_counter()
        t = 0.0
        for model, prompt in jobs:
            t += rng.expovariate(rate)
            delay = start + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one_request(client, model, prompt, max_tokens)))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def summarize(rate: float, results: list[Result], wall: float, slo: float) -> dict:
    ok = [r for r in results if r.ok]
    gaps = [g for r in ok for g in r.gaps]
    return {
        "rate": rate, "requests": len(results), "failed": len(results) - len(ok),
        "req_per_s": len(ok) / wall, "tok_per_s": sum(r.tokens for r in ok) / wall,
        "ttft_p50": percentile([r.ttft for r in ok], 50), "ttft_p99": percentile([r.ttft for r in ok], 99),
        "itl_p50": percentile(gaps, 50), "itl_p99": percentile(gaps, 99),
        "e2e_p50": percentile([r.e2e for r in ok], 50),
        "slo_share": sum(1 for r in ok if r.ttft <= slo) / max(1, len(results)),
        "errors": sorted({r.error for r in results if not r.ok})[:3],
    }


# -- the report ----------------------------------------------------------------------------

def table(rows: list[dict], slo: float) -> str:
    head = (f"| rate (req/s) | requests | failed | throughput (req/s) | output tok/s | TTFT p50 (s) | TTFT p99 (s) "
            f"| ITL p50 (ms) | ITL p99 (ms) | e2e p50 (s) | TTFT <= {slo:g} s |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    return head + "".join(
        f"| {r['rate']:g} | {r['requests']} | {r['failed']} | {r['req_per_s']:.2f} | {r['tok_per_s']:.1f} "
        f"| {r['ttft_p50']:.3f} | {r['ttft_p99']:.3f} | {r['itl_p50'] * 1e3:.1f} | {r['itl_p99'] * 1e3:.1f} "
        f"| {r['e2e_p50']:.2f} | {r['slo_share'] * 100:.0f}% |\n" for r in rows)


def plot(rows: list[dict], slo: float, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e \".[bench]\"): no plot written", file=sys.stderr)
        return False
    rates = [r["rate"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(rates, [r["ttft_p50"] for r in rows], "o-", label="TTFT p50")
    a.plot(rates, [r["ttft_p99"] for r in rows], "s--", label="TTFT p99")
    a.axhline(slo, color="grey", linestyle=":", label=f"SLO {slo:g} s")
    a.set(xlabel="arrival rate (req/s)", ylabel="seconds", title="time to first token")
    b.plot(rates, [r["itl_p50"] * 1e3 for r in rows], "o-", label="ITL p50")
    b.plot(rates, [r["itl_p99"] * 1e3 for r in rows], "s--", label="ITL p99")
    b.set(xlabel="arrival rate (req/s)", ylabel="milliseconds", title="inter-token latency")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serving",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server; without it one is started (and stopped) here")
    p.add_argument("--api-key", default=None, help="bearer key for --url (an admin's, to upload adapters)")
    p.add_argument("--model", default=None, help="base model when starting a server (default: embedded SmolLM2)")
    p.add_argument("--serve-args", default="", help="extra flags for the started server, e.g. '--dtype float32'")
    p.add_argument("--rates", default="0.5,1,2,4", help="arrival rates in requests/s, comma-separated")
    p.add_argument("--requests", type=int, default=32, help="requests per rate")
    p.add_argument("--adapters", type=int, default=32, help="distinct adapters, drawn Zipf (default 32)")
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent s: P(k) ~ 1/k^s")
    p.add_argument("--rank", type=int, default=16, help="adapter rank (all seven projections)")
    p.add_argument("--max-loras", type=int, default=8, help="device slots of the started server")
    p.add_argument("--prompt-len", default="64,256", help="prompt length range in tokens, min,max")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--ttft-slo", type=float, default=1.0, help="TTFT objective in seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", action="store_true", help="write the table and plot into benchmarks/")
    p.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"), help="markdown file for --write")
    args = p.parse_args(argv)
    rates = [float(x) for x in args.rates.split(",")]
    lo, hi = (int(x) for x in args.prompt_len.split(","))

    work = tempfile.mkdtemp(prefix="loraserve-bench-")
    proc = None
    url = args.url
    if url is None:
        proc, url = start_lora_server(args, os.path.join(work, "store"))
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
            base_id = client.get("/v1/models").json()["data"][0]["id"]
            names, vocab = register_adapters(client, args, base_id, work)
        rng = random.Random(args.seed)
        weights = zipf_weights(len(names), args.zipf)
        rows = []
        for i, rate in enumerate(rates):
            prompts = random_prompts(args.requests, lo, hi, vocab=vocab, seed=args.seed + 17 * i)
            jobs = [(rng.choices(names, weights)[0], prompt) for prompt in prompts]
            results, wall = asyncio.run(run_rate(url, headers, rate, jobs, args.max_tokens, args.seed + i))
            row = summarize(rate, results, wall, args.ttft_slo)
            rows.append(row)
            print(f"rate {rate:g}/s: {row['req_per_s']:.2f} req/s, {row['tok_per_s']:.1f} tok/s, TTFT p50/p99 "
                  f"{row['ttft_p50']:.3f}/{row['ttft_p99']:.3f} s, ITL p50/p99 {row['itl_p50'] * 1e3:.1f}/"
                  f"{row['itl_p99'] * 1e3:.1f} ms, SLO met {row['slo_share'] * 100:.0f}%, failed {row['failed']}"
                  + (f" ({'; '.join(row['errors'])})" if row["errors"] else ""), flush=True)
    finally:
        if proc is not None:
            stop_server(proc)
    setup = (f"{base_id}, {args.adapters} rank-{args.rank} adapters on all projections (Zipf s={args.zipf}), "
             f"prompts {lo}-{hi} tokens, {args.max_tokens} output tokens, {args.requests} requests per rate, "
             f"streaming /v1/completions; client and server on one machine ({platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores)" + ("" if args.url else f"; server flags: --max-loras {args.max_loras} {args.serve_args}".rstrip()))
    print("\n" + setup + "\n\n" + table(rows, args.ttft_slo))
    if args.write:
        png = os.path.join(os.path.dirname(os.path.abspath(args.results)), "serving_latency.png")
        plotted = plot(rows, args.ttft_slo, png)
        section = (f"## Online serving: latency vs arrival rate (benchmarks/serving.py)\n\n"
                   f"Measured {time.strftime('%Y-%m-%d')}: {setup}.\n"
                   f"Command: `python -m benchmarks.serving {' '.join(sys.argv[1:])}`\n\n" + table(rows, args.ttft_slo)
                   + (f"\n![latency vs rate]({os.path.basename(png)})\n" if plotted else ""))
        write_section(args.results, "serving.py", section)
        print(f"wrote {args.results}" + (f" and {png}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
