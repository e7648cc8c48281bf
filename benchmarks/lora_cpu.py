"""The CPU LoRA path (kernels/sgmv_cpu.cpp) against the memory-bandwidth roofline and
against the formulations it replaces; the CPU counterpart of benchmarks/kernels.py.

    python -m benchmarks.lora_cpu            # bf16 and fp32, prints the tables
    python -m benchmarks.lora_cpu --write    # and puts them in benchmarks/RESULTS.md
    python -m benchmarks.lora_cpu --smoke    # tiny shapes: checks that the script runs

1. copy bandwidth of this machine (torch copy_ of 512 MiB, all threads): the roofline
2. decode shapes (hidden 4096, rank 16, one projection, batch 1..256, 1 and 64 distinct
   adapters): the op's achieved bandwidth, and the same add through
   - torch bmm: add_lora_grouped, one batched matmul per shrink and expand over padded rows
   - per-adapter: a matmul pair per adapter in the batch, HF+PEFT's mixed-batch loop
3. rank-aware cost: a batch mixing rank-8 and rank-128 adapters against all-8 and all-128;
   "all 128" is also what the mixed batch costs where every adapter is padded to the
   largest rank (vLLM's layout)
4. int8 slots (`--lora-dtype int8`): the op on int8 codes against the op on slots of the
   activation dtype, same shapes, same run

Bytes counted are those the add must move at least: x, the weights of the adapters in the
batch at their rank, and y read and written. Every timed call cycles through copies of
the weights that together overflow the last-level cache, as a model's layers do.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import torch

from loraserve.kernels import add_lora_cpu, add_lora_grouped, build_lora_meta, warm_up_cpu_lora
from loraserve.kernels.sgmv import slot_a

from .results_md import write_section

MAX_ALLOC_BYTES = 4 << 30


@dataclass
class Sizes:
    hidden: int = 4096
    rank: int = 16
    batches: tuple = (1, 4, 16, 64, 256)
    adapter_counts: tuple = (1, 64)
    mix_adapters: int = 32
    mix_ranks: tuple = (8, 128)
    llc_bytes: int = 32 << 20      # this machine's L3 (lscpu); weight copies overflow twice that
    copy_bytes: int = 512 << 20


SMOKE = Sizes(hidden=256, batches=(1, 4), adapter_counts=(1, 4), mix_adapters=4, mix_ranks=(8, 32),
              llc_bytes=0, copy_bytes=8 << 20)


def copy_bandwidth(sizes: Sizes) -> float:
    src = torch.empty(sizes.copy_bytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * src.numel() / best_ms(lambda: dst.copy_(src), reps=5) / 1e6


def best_ms(fn, reps: int) -> float:
    """Best of `reps` calls in ms: the noise on a shared machine only ever adds time."""
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def per_adapter_loop(y, x, A, Bs, out_slices, meta, scale=None):
    """HF+PEFT's mixed-batch formulation: for each adapter, gather its tokens, run its
    two matmuls, scatter the delta back."""
    slots = meta.token_slots.tolist()
    ranks = meta.slot_ranks.tolist()
    for s in sorted(set(slots) - {-1}):
        idx = torch.tensor([t for t, u in enumerate(slots) if u == s])
        r = ranks[s]
        for p, ((off, size), B) in enumerate(zip(out_slices, Bs)):
            delta = (x.index_select(0, idx) @ slot_a(A, s, r)[:, p::len(Bs)]) @ B[s, :r]
            y[:, off:off + size].index_add_(0, idx, delta)
    return y


class Problem:
    """One LoRA add: a batch of tokens over `len(ranks)` adapters (token t uses adapter
    t % n), weights in slot buffers at the largest rank, copied until the bytes one add
    reads, over all copies, are twice the LLC."""

    def __init__(self, hidden: int, ranks: list[int], batch: int, dtype, llc_bytes: int, int8: bool = False):
        n, r_max = len(ranks), max(ranks)
        slots = [t % n for t in range(batch)]
        used = sum(ranks[s] for s in set(slots))
        wsize = 1 if int8 else dtype.itemsize
        self.bytes = used * 2 * hidden * wsize + 3 * batch * hidden * dtype.itemsize
        copy_bytes = n * 2 * hidden * r_max * wsize
        self.copies = max(1, min(-(-2 * llc_bytes // self.bytes), MAX_ALLOC_BYTES // copy_bytes))
        if int8:       # codes and the per-column scale int8 slots hold (adapters/slot_pool.py LoRAGroup)
            codes = lambda *shape: torch.randint(-127, 128, shape, dtype=torch.int8)
            self.weights = [(codes(n, hidden, r_max, 1), [codes(n, r_max, hidden)]) for _ in range(self.copies)]
        else:
            self.weights = [(torch.randn(n, hidden, r_max, 1, dtype=dtype) / hidden ** 0.5,
                             [torch.randn(n, r_max, hidden, dtype=dtype) / r_max ** 0.5])
                            for _ in range(self.copies)]
        self.scale = torch.full((n, r_max), 1e-6) if int8 else None
        self.meta = build_lora_meta(slots, ranks)
        self.x = torch.randn(batch, hidden, dtype=dtype)
        self.y = torch.zeros(batch, hidden, dtype=dtype)
        self.out_slices = [(0, hidden)]

    def ms(self, impl, reps: int = 5) -> float:
        """ms per add, each add on the next weight copy."""
        def run():
            for A, Bs in self.weights:
                impl(self.y, self.x, A, Bs, self.out_slices, self.meta, scale=self.scale)
        return best_ms(run, reps) / self.copies


def bench_decode(sizes: Sizes, dtype, copy_gbs: float) -> str:
    hidden, rank = sizes.hidden, sizes.rank
    lines = [f"### decode shapes: hidden {hidden}, rank {rank}, one projection, {dtype}",
             "", "| adapters | batch | op us | op GB/s | % of copy | torch bmm us | per-adapter us "
             "| torch bmm / op | per-adapter / op |", "|---|---|---|---|---|---|---|---|---|"]
    print("\n" + "\n".join(lines), flush=True)
    for n in sizes.adapter_counts:
        for batch in sizes.batches:
            pb = Problem(hidden, [rank] * n, batch, dtype, sizes.llc_bytes)
            op, bmm, loop = pb.ms(add_lora_cpu), pb.ms(add_lora_grouped), pb.ms(per_adapter_loop, reps=2)
            gbs = pb.bytes / op / 1e6
            lines.append(f"| {n} | {batch} | {op * 1e3:.0f} | {gbs:.1f} | {100 * gbs / copy_gbs:.0f}% | "
                         f"{bmm * 1e3:.0f} | {loop * 1e3:.0f} | {bmm / op:.2f} | {loop / op:.2f} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def bench_rank_mix(sizes: Sizes, dtype) -> str:
    hidden, n, (low, high) = sizes.hidden, sizes.mix_adapters, sizes.mix_ranks
    lines = [f"### rank-aware cost: hidden {hidden}, {n} adapters, ranks {low} and {high}, {dtype}",
             "", f"| path | batch | all {low} us | all {high} us | mixed us | mean of all-{low} and all-{high} "
             f"| mixed / mean | mixed / all {high} |", "|---|---|---|---|---|---|---|---|"]
    print("\n" + "\n".join(lines), flush=True)
    for name, impl in (("op", add_lora_cpu), ("torch bmm", add_lora_grouped)):
        for batch in (n, 4 * n):
            t = {key: Problem(hidden, ranks, batch, dtype, sizes.llc_bytes).ms(impl) for key, ranks in
                 (("low", [low] * n), ("high", [high] * n), ("mixed", [low, high] * (n // 2)))}
            mean = (t["low"] + t["high"]) / 2
            lines.append(f"| {name} | {batch} | {t['low'] * 1e3:.0f} | {t['high'] * 1e3:.0f} | "
                         f"{t['mixed'] * 1e3:.0f} | {mean * 1e3:.0f} | {t['mixed'] / mean:.2f} | "
                         f"{t['mixed'] / t['high']:.2f} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def bench_int8(sizes: Sizes, dtype) -> str:
    hidden, rank = sizes.hidden, sizes.rank
    lines = [f"### int8 slots: hidden {hidden}, rank {rank}, one projection, activations {dtype}",
             "", f"| adapters | batch | {dtype} slots us | int8 slots us | {dtype} / int8 |", "|---|---|---|---|---|"]
    print("\n" + "\n".join(lines), flush=True)
    for n in sizes.adapter_counts:
        for batch in sizes.batches:
            full = Problem(hidden, [rank] * n, batch, dtype, sizes.llc_bytes).ms(add_lora_cpu)
            q = Problem(hidden, [rank] * n, batch, dtype, sizes.llc_bytes, int8=True).ms(add_lora_cpu)
            lines.append(f"| {n} | {batch} | {full * 1e3:.0f} | {q * 1e3:.0f} | {full / q:.2f} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lora_cpu",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated torch dtypes")
    parser.add_argument("--only", choices=["decode", "ranks", "int8"], help="run one section")
    parser.add_argument("--write", action="store_true", help="replace this script's section of RESULTS.md")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, to check that the script runs")
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else Sizes()

    warm_up_cpu_lora()
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth(sizes)
    head = (f"## CPU LoRA op vs the roofline and the torch formulations (benchmarks/lora_cpu.py)\n\n"
            f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}; measured copy bandwidth "
            f"{copy_gbs:.1f} GB/s (read + write). The op mostly reads, so it can pass 100% of it.\n"
            f"Command: `python -m benchmarks.lora_cpu {' '.join(sys.argv[1:])}`")
    print(head, flush=True)
    sections = [head]
    with torch.inference_mode():
        for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
            if args.only in (None, "decode"):
                sections.append(bench_decode(sizes, dtype, copy_gbs))
            if args.only in (None, "ranks"):
                sections.append(bench_rank_mix(sizes, dtype))
            if args.only in (None, "int8"):
                sections.append(bench_int8(sizes, dtype))
    if args.write and not args.smoke:
        write_section(os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"),
                      "lora_cpu.py", "\n\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
