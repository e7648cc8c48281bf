"""The C++ CPU paged-attention op (kernels/cpu_paged_attention.cpp) against the path it
replaces (kernels/cpu_attention.py: index_select gather of the blocks, then matmuls or
SDPA), one layer's call at SmolLM2-135M shapes (9 q heads, 3 kv heads, head_dim 64,
block 16) on the head-major cache the torch backend allocates.

    python -m benchmarks.cpu_attention            # bf16 and fp32, decode and prefill
    python -m benchmarks.cpu_attention --threads 1   # one core: less noise on a shared machine
    python -m benchmarks.cpu_attention --smoke    # tiny shapes: checks that the script runs

Each shape times the two implementations alternately (op, path, op, path, ...) in the
same run and reports the median of each and their ratio; contexts are drawn uniformly
from the given range, and each sequence's blocks are scattered over the pool.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from loraserve.kernels import cpu_attention, cpu_paged_attention

H, H_KV, D, BLOCK = 9, 3, 64, 16


def make(batch: int, ctx_range: tuple[int, int], q_tokens: list[int] | None, dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ctx = torch.randint(ctx_range[0], ctx_range[1] + 1, (batch,), generator=gen).tolist()
    need = [-(-c // BLOCK) for c in ctx]
    num_blocks = sum(need) + 8
    k = cpu_attention.allocate_cache(num_blocks, BLOCK, H_KV, D, dtype, "cpu")
    v = cpu_attention.allocate_cache(num_blocks, BLOCK, H_KV, D, dtype, "cpu")
    k.copy_(torch.randn(k.shape, generator=gen))
    v.copy_(torch.randn(v.shape, generator=gen))
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(batch, max(need), dtype=torch.int64)
    start = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[start : start + n]
        start += n
    T = batch if q_tokens is None else sum(q_tokens)
    q = torch.randn(T, H, D, generator=gen).to(dtype)
    return q, k, v, tables, ctx


def time_pair(fns: dict, reps: int) -> dict[str, float]:
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()                                           # warm-up
    for _ in range(reps):
        for name, fn in fns.items():                   # alternated, same run
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def decode_case(batch, ctx_range, dtype, reps):
    q, k, v, tables, ctx = make(batch, ctx_range, None, dtype)
    lens, scale = torch.tensor(ctx), D ** -0.5
    fns = {
        "op": lambda: cpu_paged_attention.paged_attention_decode(q, k, v, tables, lens, max(ctx), scale),
        "gather": lambda: cpu_attention.paged_attention_decode(q, k, v, tables, lens, max(ctx), scale),
    }
    torch.testing.assert_close(fns["op"]().float(), fns["gather"]().float(), atol=2e-2, rtol=2e-2)
    return time_pair(fns, reps)


def prefill_case(batch, q_len, prefix, dtype, reps):
    q, k, v, tables, ctx = make(batch, (q_len + prefix, q_len + prefix), [q_len] * batch, dtype)
    qls, scale = [q_len] * batch, D ** -0.5
    fns = {
        "op": lambda: cpu_paged_attention.paged_attention_prefill(q, k, v, tables, qls, ctx, scale),
        "gather": lambda: cpu_attention.paged_attention_prefill(q, k, v, tables, qls, ctx, scale),
    }
    torch.testing.assert_close(fns["op"]().float(), fns["gather"]().float(), atol=2e-2, rtol=2e-2)
    return time_pair(fns, reps)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if cpu_paged_attention.extension() is None:
        raise SystemExit("the C++ op does not build here")
    reps = 2 if args.smoke else args.reps
    decode = [(4, (10, 40))] if args.smoke else [(64, (100, 200)), (64, (100, 600)), (128, (100, 200)),
                                                  (128, (100, 600))]
    prefill = [(1, 8, 0)] if args.smoke else [(4, 128, 0), (1, 512, 0), (4, 64, 256)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; H={H} H_kv={H_KV} D={D} block={BLOCK}")
    print("| dtype | op | shape | C++ op ms | gather path ms | gather / op |")
    print("|---|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        dt = str(dtype).removeprefix("torch.")
        for batch, rng in decode:
            t = decode_case(batch, rng, dtype, reps)
            print(f"| {dt} | decode | batch {batch}, ctx {rng[0]}-{rng[1]} | {t['op']:.3f} | {t['gather']:.3f} "
                  f"| {t['gather'] / t['op']:.2f}x |", flush=True)
        for batch, q_len, prefix in prefill:
            t = prefill_case(batch, q_len, prefix, dtype, max(2, reps // 4))
            print(f"| {dt} | prefill | {batch} x {q_len} new after {prefix} cached | {t['op']:.3f} "
                  f"| {t['gather']:.3f} | {t['gather'] / t['op']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
