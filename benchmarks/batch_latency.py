"""Interactive latency while a Batch API batch runs, against no batch, in the same run.

    python -m benchmarks.batch_latency                    # starts `loraserve serve` itself (embedded SmolLM2)
    python -m benchmarks.batch_latency --lines 500 --probes 24 --concurrency 8
    python -m benchmarks.batch_latency --caps 0,1,16 --context-words 300   # the background cap, A/B/C

A probe is one streamed chat request (greedy, --probe-tokens tokens), sent one after the
other, --gap seconds apart; its TTFT is the time to the first streamed chunk, its ITL the
mean gap between the chunks after it. Probes run in three phases of one server, which
take turns for --rounds rounds:

    idle      no other traffic
    batch     while a --lines batch runs through /v1/batches (a new one each round, cancelled
              once its probes are done)
    control   while the same kind of requests arrive as ordinary interactive traffic,
              --concurrency at a time: the load without the batch priority (--no-control skips it)

and the script prints TTFT and ITL per phase with their ratio to idle, and how many load
requests were answered while the probes ran (each batch must still be running when its
probes end, or the figure would not be "while a batch runs": the script says so if not).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import httpx
from .results_md import write_section
from .serve_process import start_server, stop_server

HERE = os.path.dirname(os.path.abspath(__file__))
TOPICS = ["the sea", "a robot", "a small town", "the moon", "a lost key", "winter", "a library", "a train"]


def start_batch_server(args, work: str, cap: str | None = None):
    serve_args = ["--adapter-dir", os.path.join(work, "store"), "--batch-concurrency", str(args.concurrency),
                  "--log-level", "warning"]
    if cap is not None:
        serve_args += ["--max-background-tokens", cap]
    return start_server(serve_args + (["--model", args.model] if args.model else []))


def chat_body(model: str, text: str, max_tokens: int, stream: bool = False) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": stream}


def load_text(i: int, context_words: int = 0) -> str:
    """A batch line's prompt; `context_words` words of notes before it make a long prompt."""
    notes = " ".join(TOPICS[(i + k) % len(TOPICS)].split()[-1] for k in range(context_words))
    ask = f"Write a short story about {TOPICS[i % len(TOPICS)]}, story number {i}."
    return f"Notes: {notes}\n{ask}" if context_words else ask


async def probe(client: httpx.AsyncClient, model: str, max_tokens: int) -> tuple[float, float]:
    """(TTFT, mean inter-chunk gap) of one streamed chat request."""
    start = time.perf_counter()
    stamps = []
    body = chat_body(model, "What is the capital of France?", max_tokens, stream=True)
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return stamps[0] - start, statistics.mean(gaps) if gaps else float("nan")


async def probes(client: httpx.AsyncClient, args, model: str, n: int) -> list[tuple[float, float]]:
    out = []
    for _ in range(n):
        out.append(await probe(client, model, args.probe_tokens))
        await asyncio.sleep(args.gap)
    return out


async def upload_batch_file(client: httpx.AsyncClient, args, model: str) -> str:
    lines = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": chat_body(model, load_text(i, args.context_words), args.batch_tokens)}
             for i in range(args.lines)]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    r = await client.post("/v1/files", data={"purpose": "batch"}, files={"file": ("batch.jsonl", data)})
    r.raise_for_status()
    return r.json()["id"]


async def batch_phase(client: httpx.AsyncClient, args, model: str, file_id: str, n: int) -> tuple[list, dict]:
    """Probes while a new batch over `file_id` runs; the batch is cancelled after them."""
    r = await client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                               "completion_window": "24h"})
    r.raise_for_status()
    batch_id = r.json()["id"]
    while (b := (await client.get(f"/v1/batches/{batch_id}")).json())["request_counts"]["completed"] < 1:
        await asyncio.sleep(0.2)                  # probe only once lines are flowing
    done_before = b["request_counts"]["completed"]
    start = time.perf_counter()
    results = await probes(client, args, model, n)
    seconds = time.perf_counter() - start
    during = (await client.get(f"/v1/batches/{batch_id}")).json()
    await client.post(f"/v1/batches/{batch_id}/cancel")
    while (await client.get(f"/v1/batches/{batch_id}")).json()["status"] != "cancelled":
        await asyncio.sleep(0.2)
    info = {"running": during["status"] == "in_progress",
            "answered": during["request_counts"]["completed"] - done_before, "seconds": seconds}
    return results, info


async def control_phase(client: httpx.AsyncClient, args, model: str, n: int) -> tuple[list, dict]:
    """The same kind of requests as the batch lines, as ordinary traffic, --concurrency at a time."""
    stop = asyncio.Event()
    answered = 0

    async def worker(k: int) -> None:
        nonlocal answered
        i = k
        while not stop.is_set():
            r = await client.post("/v1/chat/completions",
                                  json=chat_body(model, load_text(i, args.context_words), args.batch_tokens))
            r.raise_for_status()
            answered += 1
            i += args.concurrency

    workers = [asyncio.create_task(worker(k)) for k in range(args.concurrency)]
    while answered < 1:
        await asyncio.sleep(0.2)
    done_before = answered
    start = time.perf_counter()
    results = await probes(client, args, model, n)
    seconds = time.perf_counter() - start
    info = {"running": True, "answered": answered - done_before, "seconds": seconds}
    stop.set()
    await asyncio.gather(*workers)
    return results, info


def row(name: str, results: list[tuple[float, float]], infos: list[dict], idle: list[tuple[float, float]]) -> str:
    ttft = sorted(t for t, _ in results)
    itl = [g for _, g in results]
    base_ttft = statistics.median(t for t, _ in idle)
    base_itl = statistics.median(g for _, g in idle)
    load = ""
    if infos:
        load = f"{sum(i['answered'] for i in infos)} in {sum(i['seconds'] for i in infos):.0f} s"
    p90 = ttft[min(len(ttft) - 1, round(0.9 * (len(ttft) - 1)))]
    return (f"| {name} | {statistics.median(ttft) * 1e3:.0f} | {p90 * 1e3:.0f} | "
            f"{statistics.median(ttft) / base_ttft:.2f}x | {statistics.median(itl) * 1e3:.1f} | "
            f"{statistics.median(itl) / base_itl:.2f}x | {load} |")


async def run(args, urls: dict[str, str]) -> int:
    """`urls`: one server per label (a --max-background-tokens value, or "server"); each
    round takes every server's phases in turn, so a drift in the machine's load hits
    them alike and the servers' figures compare within one run."""
    per_round = max(1, args.probes // args.rounds)
    clients = {label: httpx.AsyncClient(base_url=url, timeout=600) for label, url in urls.items()}
    phases = {label: {"idle": ([], []), "batch": ([], []), "control": ([], [])} for label in urls}
    try:
        setup = {}
        for label, client in clients.items():
            model = (await client.get("/v1/models")).json()["data"][0]["id"]
            setup[label] = model, await upload_batch_file(client, args, model)
            await probes(client, args, model, 2)                   # warm-up
        for _ in range(args.rounds):
            for label, client in clients.items():
                model, file_id = setup[label]
                await one_round(client, args, model, file_id, per_round, phases[label])
    finally:
        for client in clients.values():
            await client.aclose()
    report = "\n".join(table(args, setup[label][0], per_round, phases[label], label) for label in urls)
    print("\n" + report)
    if args.write:
        write_section(os.path.join(HERE, "RESULTS.md"), "batch_latency.py", report)
    return 0


async def one_round(client: httpx.AsyncClient, args, model: str, file_id: str, per_round: int, phases: dict) -> None:
    phases["idle"][0].extend(await probes(client, args, model, per_round))
    for name, phase in (("batch", batch_phase), ("control", control_phase)):
        if name == "control" and not args.control:
            continue
        extra = (file_id,) if name == "batch" else ()
        results, info = await phase(client, args, model, *extra, per_round)
        phases[name][0].extend(results)
        phases[name][1].append(info)


def table(args, model: str, per_round: int, phases: dict, label: str = "server") -> str:
    idle = phases["idle"][0]
    cap = "the server's own" if label == "server" else label
    lines = [
        f"## Interactive latency while a batch runs (benchmarks/batch_latency.py), --max-background-tokens {cap}", "",
        "`" + " ".join(["python -m benchmarks.batch_latency", *sys.argv[1:]]) + "`", "",
        f"model {model}; {per_round * args.rounds} probes per phase in {args.rounds} rounds ({args.probe_tokens} "
        f"tokens, greedy, one at a time, {args.gap} s apart); a new batch of {args.lines} lines of "
        f"{args.batch_tokens} tokens each round ({args.context_words} words of notes before each prompt), "
        f"--batch-concurrency {args.concurrency}; "
        f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end", "",
        "| phase | TTFT p50 (ms) | TTFT p90 (ms) | TTFT p50 / idle | ITL p50 (ms) | ITL p50 / idle | "
        "load requests answered meanwhile |",
        "|---|---|---|---|---|---|---|",
        row("idle", idle, [], idle),
        row(f"{args.lines}-line batch running", *phases["batch"], idle=idle),
    ]
    if args.control:
        lines.append(row(f"same load as interactive requests ({args.concurrency} at a time)", *phases["control"],
                         idle=idle))
    ratio = statistics.median(t for t, _ in phases["batch"][0]) / statistics.median(t for t, _ in idle)
    lines += ["", f"interactive TTFT p50 with the batch running / without: {ratio:.2f}"]
    if not all(info["running"] for info in phases["batch"][1]):
        lines.append("NOTE: a batch ended before its probes did, so some probes ran without it: run with more --lines")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.batch_latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running server (default: start `loraserve serve` here)")
    p.add_argument("--model", default=None, help="the model the started server serves (default: embedded SmolLM2)")
    p.add_argument("--lines", type=int, default=500, help="requests in the batch (default: 500)")
    p.add_argument("--batch-tokens", type=int, default=32, help="max_tokens of each batch line (default: 32)")
    p.add_argument("--concurrency", type=int, default=8, help="--batch-concurrency of the started server, and "
                   "the concurrent requests of the control phase (default: 8)")
    p.add_argument("--probes", type=int, default=18, help="interactive probes per phase (default: 18)")
    p.add_argument("--rounds", type=int, default=3, help="turns the phases take (default: 3)")
    p.add_argument("--probe-tokens", type=int, default=8, help="max_tokens of each probe (default: 8)")
    p.add_argument("--gap", type=float, default=0.25, help="seconds between probes (default: 0.25)")
    p.add_argument("--no-control", dest="control", action="store_false", help="skip the control phase")
    p.add_argument("--context-words", type=int, default=0, help="words of notes before each batch line's prompt: "
                   "long prompts, whose prefill the background cap chunks (default: 0)")
    p.add_argument("--caps", default=None, metavar="N,N,...", help="start one server per "
                   "--max-background-tokens value (0 = no cap) and compare them in the same run "
                   "(default: one server with its own)")
    p.add_argument("--write", action="store_true", help="put the table into benchmarks/RESULTS.md (its own section)")
    args = p.parse_args(argv)
    if args.url:
        return asyncio.run(run(args, {"server": args.url}))
    caps = args.caps.split(",") if args.caps else [None]
    with tempfile.TemporaryDirectory() as work:
        procs, urls = [], {}
        try:
            for cap in caps:
                proc, url = start_batch_server(args, os.path.join(work, f"cap-{cap}"), cap)
                procs.append(proc)
                urls["server" if cap is None else cap] = url
            return asyncio.run(run(args, urls))
        finally:
            for proc in procs:
                stop_server(proc)


if __name__ == "__main__":
    raise SystemExit(main())
