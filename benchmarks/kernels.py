"""Kernel benchmarks against the memory-bandwidth roofline (needs CUDA).

    python -m benchmarks.kernels            # on a GPU
    python -m benchmarks.kernels --tune     # first sweep the SGMV launch sizes, then use the best
    python -m benchmarks.kernels --smoke    # anywhere: tiny shapes, Triton interpreter on CPU

1. copy bandwidth of the device (torch copy_ of 512 MiB): the roofline
2. LoRA decode shapes (hidden 4096, rank 16, batch 1..256, 1 and 64 distinct adapters):
   SGMV and BGMV shrink and expand, achieved bandwidth as a fraction of the copy
   bandwidth, and the whole add_lora against the torch path (add_lora_grouped) on the GPU;
   then rank-aware compute: a batch mixing rank 8 and rank 128 against all-8 and all-128
3. paged attention decode (Llama-3-8B heads: 32 q, 8 kv, head_dim 128): bandwidth and the
   torch reference
4. a decode step of a Llama-3.2-1B-shaped layer stack (16 layers, random weights, no RoPE)
   with 64 adapters of rank 16 on all seven projections, against the same step with no
   adapters (the whole step captured in a CUDA graph); --profile adds its kernel table

Bytes counted are the bytes a kernel must move at least: x, the weights of the adapters
in the batch (at their rank), v and y; for attention the cached K and V it reads.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass


@dataclass
class Shapes:
    hidden: int = 4096
    rank: int = 16
    batches: tuple = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    adapter_counts: tuple = (1, 64)
    # attention
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16
    attn_batches: tuple = (1, 8, 32, 128)
    context_len: int = 2048
    # Llama-3.2-1B
    model_hidden: int = 2048
    model_intermediate: int = 8192
    model_layers: int = 16
    model_heads: int = 32
    model_kv_heads: int = 8
    model_batches: tuple = (64, 256)
    model_context: int = 512
    model_adapters: int = 64


SMOKE = Shapes(hidden=64, rank=4, batches=(1, 7), adapter_counts=(1, 4), heads=4, kv_heads=2, head_dim=16,
               attn_batches=(2,), context_len=40, model_hidden=64, model_intermediate=128, model_layers=2,
               model_heads=4, model_kv_heads=2, model_batches=(4,), model_context=20, model_adapters=4)


class Timer:
    """Milliseconds per call: triton's do_bench (L2 flushed between calls) on CUDA; a
    wall-clock loop on CPU, where the numbers only show that the script runs."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def __call__(self, fn, graph: bool = False) -> float:
        fn()                                        # first call compiles; caches device tables
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        import triton.testing

        if graph:
            return triton.testing.do_bench_cudagraph(fn, rep=100)
        return triton.testing.do_bench(fn, warmup=25, rep=100)


def copy_bandwidth(timer: Timer, device: str) -> float:
    import torch

    nbytes = (512 << 20) if timer.cuda else (8 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6                    # GB/s: read + write


def lora_weights(num_slots: int, in_features: int, outs: list[int], rank: int, dtype, device):
    """Random slot buffers allocated as the model does (kernels/sgmv.py layout)."""
    import torch

    from loraserve.kernels.sgmv import capacity_rank

    r = capacity_rank(rank)
    A = torch.randn(num_slots, in_features, r, len(outs), dtype=dtype, device=device) / in_features ** 0.5
    Bs = [torch.randn(num_slots, r, o, dtype=dtype, device=device) / r ** 0.5 for o in outs]
    return A, Bs


def layer_copies(timer: Timer, bytes_per_layer: int, cap: int = 64) -> int:
    """Distinct weight copies a timed graph cycles through, so that together they
    overflow the L2 cache as a model's layers do (a decode step never finds adapter
    weights in L2). Few bytes (one adapter) stay L2-resident even at the cap."""
    if not timer.cuda:
        return 1
    import torch

    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, min(cap, -(-2 * l2 // max(1, bytes_per_layer))))


def per_call(timer: Timer, fn, copies: int) -> float:
    """ms per call of `fn(i)`, i over the copies, replayed back to back in one CUDA graph
    (a decode step runs under CUDA graphs: this leaves launch overhead out)."""
    return timer(lambda: [fn(i) for i in range(copies)], graph=True) / copies


class LoRAProblem:
    """One decode-shaped LoRA problem, with weight copies enough to defeat the L2 cache."""

    def __init__(self, timer, device, hidden_in, outs, rank, num_adapters, batch, dtype, ranks=None):
        """Every slot at `rank`, or at ranks[slot] in buffers sized to the largest."""
        import torch

        from loraserve.kernels import LoRABlocks, build_lora_meta
        from loraserve.kernels.sgmv import sgmv_shrink_splits

        ranks = ranks or [rank] * num_adapters
        slots = [t % num_adapters for t in range(batch)]
        used_ranks = sum(ranks[s] for s in set(slots))
        self.out_slices = [(sum(outs[:i]), o) for i, o in enumerate(outs)]
        self.copies = layer_copies(timer, used_ranks * (hidden_in * len(outs) + sum(outs)) * 2)
        self.weights = [lora_weights(num_adapters, hidden_in, outs, max(ranks), dtype, device)
                        for _ in range(self.copies)]
        self.meta = build_lora_meta(slots, ranks, device=device)     # what BGMV and the torch path read
        self.blocks = LoRABlocks.of(self.meta)                          # what SGMV reads
        self.x = torch.randn(batch, hidden_in, dtype=dtype, device=device)
        self.y = torch.zeros(batch, sum(outs), dtype=dtype, device=device)
        self.v = sgmv_shrink_splits(self.x, self.weights[0][0], self.blocks)   # the add's split-K partials
        self.shrink_bytes = self.x.numel() * 2 + used_ranks * hidden_in * len(outs) * 2 + self.v.numel() * 4
        self.expand_bytes = self.v.numel() * 4 + used_ranks * sum(outs) * 2 + 2 * self.y.numel() * 2

    def shrink(self, impl, meta, **launch):
        return lambda i: impl(self.x, self.weights[i][0], meta, **launch)

    def expand(self, impl, meta, **launch):
        return lambda i: impl(self.y, self.v, self.weights[i][1], self.out_slices, meta, **launch)

    def add(self, impl, meta, **launch):
        return lambda i: impl(self.y, self.x, *self.weights[i], self.out_slices, meta, **launch)


def bench_lora(shapes: Shapes, timer: Timer, device: str, copy_gbs: float, launch) -> None:
    import torch

    from loraserve.kernels import add_lora_bgmv, add_lora_grouped, add_lora_sgmv, bgmv_expand, sgmv_expand
    from loraserve.kernels.sgmv import bgmv_shrink_splits, sgmv_shrink_splits

    dtype = torch.bfloat16
    h, r = shapes.hidden, shapes.rank
    print(f"\n## LoRA decode: hidden {h}, rank {r}, one projection, {dtype}; GB/s and % of copy bandwidth "
          "(CUDA-graph replay over weight copies that overflow L2)")
    print(f"{'adapters':>8} {'batch':>5} | {'sgmv shrink':>18} {'sgmv expand':>18} | {'bgmv shrink':>18} "
          f"{'bgmv expand':>18} | {'sgmv us':>9} {'bgmv us':>8} {'torch us':>8} {'torch/sgmv':>12}")
    for num_adapters in shapes.adapter_counts:
        for batch in shapes.batches:
            pb = LoRAProblem(timer, device, h, [h], r, num_adapters, batch, dtype)

            def gbs(ms, nbytes):
                return f"{nbytes / ms / 1e6:8.0f} {100 * nbytes / ms / 1e6 / copy_gbs:7.1f}%"
            row = [gbs(per_call(timer, pb.shrink(sgmv_shrink_splits, pb.blocks, launch=launch), pb.copies),
                       pb.shrink_bytes),
                   gbs(per_call(timer, pb.expand(sgmv_expand, pb.blocks, launch=launch), pb.copies), pb.expand_bytes),
                   gbs(per_call(timer, pb.shrink(bgmv_shrink_splits, pb.meta, launch=launch), pb.copies),
                       pb.shrink_bytes),
                   gbs(per_call(timer, pb.expand(bgmv_expand, pb.meta), pb.copies), pb.expand_bytes)]
            t_triton = per_call(timer, pb.add(add_lora_sgmv, pb.blocks, launch=launch), pb.copies)
            t_bgmv = per_call(timer, pb.add(add_lora_bgmv, pb.meta, launch=launch), pb.copies)
            torch_add = pb.add(add_lora_grouped, pb.meta)
            t_torch = timer(lambda: torch_add(0))       # eager: it decides on the host
            print(f"{num_adapters:>8} {batch:>5} | {row[0]:>18} {row[1]:>18} | {row[2]:>18} {row[3]:>18} | "
                  f"{t_triton * 1e3:9.1f} {t_bgmv * 1e3:8.1f} {t_torch * 1e3:8.1f} {t_torch / t_triton:12.2f}")
            del pb, torch_add


def bench_rank_mix(shapes: Shapes, timer: Timer, device: str, launch) -> None:
    """Rank-aware compute: a batch mixing rank 8 and rank 128 adapters should cost about
    the mean of an all-8 and an all-128 batch, not what padding everyone to 128 costs."""
    import torch

    from loraserve.kernels import add_lora_triton

    h, n = shapes.hidden, max(shapes.adapter_counts)
    low, high = 8, (128 if timer.cuda else 16)
    print(f"\n## rank-aware LoRA: hidden {h}, {n} adapters, slot buffers at rank {high}, add_lora_triton us")
    print(f"{'batch':>5} | {f'all {low}':>8} {f'all {high}':>9} {'mixed':>8} {'mean':>8} {'mixed/mean':>10}")
    for batch in (n, 4 * n):
        times = {}
        for name, ranks in (("low", [low] * n), ("high", [high] * n), ("mixed", [low, high] * (n // 2))):
            pb = LoRAProblem(timer, device, h, [h], high, n, batch, torch.bfloat16, ranks=ranks)
            times[name] = per_call(timer, pb.add(add_lora_triton, pb.blocks, launch=launch), pb.copies) * 1e3
            del pb
        mean = (times["low"] + times["high"]) / 2
        print(f"{batch:>5} | {times['low']:8.1f} {times['high']:9.1f} {times['mixed']:8.1f} {mean:8.1f} "
              f"{times['mixed'] / mean:10.2f}")


TUNE_SHAPES = [  # (in, outs, adapters, batch): decode shapes of the kernels and of Llama-3.2-1B's layers
    (4096, [4096], 64, 64), (4096, [4096], 64, 256), (4096, [4096], 64, 16), (4096, [4096], 8, 64),
    (4096, [4096], 1, 64), (2048, [2048, 512, 512], 64, 64), (8192, [2048], 64, 256), (2048, [8192, 8192], 64, 64),
]


def tune(timer: Timer, device: str):
    """Sweep the GPU launch block sizes (kernels/sgmv.py GpuLaunch) on decode shapes,
    print the summed time of each setting, best first, and return the best, which the
    rest of the run passes to every launch."""
    import dataclasses
    import itertools

    import torch

    from loraserve.kernels import DEFAULT_LAUNCH, sgmv_expand
    from loraserve.kernels.sgmv import sgmv_shrink_splits

    problems = [LoRAProblem(timer, device, i, outs, 16, n, b, torch.bfloat16) for i, outs, n, b in TUNE_SHAPES]
    default = DEFAULT_LAUNCH
    best = {}
    sweeps = {
        "shrink": (sgmv_shrink_splits, dict(shrink_block_k=[64, 128, 256], shrink_min_programs=[256, 512, 1024],
                                     shrink_warps=[2, 4], shrink_stages=[2, 4])),
        "expand": (sgmv_expand, dict(expand_block_n=[64, 128, 256, 512], expand_warps=[2, 4])),
    }
    for name, (impl, grid) in sweeps.items():
        results = []
        for values in itertools.product(*grid.values()):
            setting = dict(zip(grid, values))
            launch = dataclasses.replace(default, **setting)
            pick = ((lambda p: p.shrink(impl, p.blocks, launch=launch)) if name == "shrink"
                    else (lambda p: p.expand(impl, p.blocks, launch=launch)))
            times = [per_call(timer, pick(p), p.copies) * 1e3 for p in problems]
            results.append((sum(times), setting, times))
        results.sort(key=lambda r: r[0])
        best.update(results[0][1])
        print(f"\n## tune {name}: summed us over {len(problems)} decode shapes, then per shape")
        for total, setting, times in results[:6] + [r for r in results if all(
                getattr(default, k) == v for k, v in r[1].items())]:
            print(f"{total:8.1f}  {setting}  " + " ".join(f"{t:.1f}" for t in times))
    launch = dataclasses.replace(default, **best)
    print(f"\nthe rest of this run uses {launch}")
    return launch


def paged_cache(num_seqs: int, context_len: int, kv_heads: int, head_dim: int, block_size: int, dtype, device):
    """Caches holding num_seqs sequences of context_len tokens in shuffled blocks, laid
    out as the model allocates them (contiguous on CUDA, head-major on CPU)."""
    import torch

    from loraserve.kernels import select_kernels

    allocate_kv_cache = select_kernels(device).allocate_kv_cache

    per_seq = -(-context_len // block_size)
    num_blocks = num_seqs * per_seq
    k_cache = allocate_kv_cache(num_blocks, block_size, kv_heads, head_dim, dtype, device).normal_()
    v_cache = allocate_kv_cache(num_blocks, block_size, kv_heads, head_dim, dtype, device).normal_()
    tables = torch.randperm(num_blocks, device=device).view(num_seqs, per_seq)
    return k_cache, v_cache, tables


def bench_attention(shapes: Shapes, timer: Timer, device: str, copy_gbs: float) -> None:
    import torch

    from loraserve.kernels.paged_attention import paged_attention_decode, paged_attention_decode_triton

    dtype = torch.bfloat16
    H, H_kv, D, ctx = shapes.heads, shapes.kv_heads, shapes.head_dim, shapes.context_len
    print(f"\n## paged attention decode: {H} heads, {H_kv} kv heads, head_dim {D}, block {shapes.block_size}, "
          f"context {ctx}, {dtype}")
    print(f"{'batch':>5} | {'triton us':>9} {'GB/s':>8} {'% copy':>7} | {'torch us':>9} {'torch/triton':>12}")
    for batch in shapes.attn_batches:
        k_cache, v_cache, tables = paged_cache(batch, ctx, H_kv, D, shapes.block_size, dtype, device)
        k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()    # the Triton layout, also on CPU
        q = torch.randn(batch, H, D, dtype=dtype, device=device)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        args = (q, k_cache, v_cache, tables, lens, ctx, D ** -0.5)
        t_triton = timer(lambda: paged_attention_decode_triton(*args))
        t_torch = timer(lambda: paged_attention_decode(*args))
        nbytes = 2 * batch * ctx * H_kv * D * 2 + 2 * q.numel() * 2
        gbs = nbytes / t_triton / 1e6
        print(f"{batch:>5} | {t_triton * 1e3:9.1f} {gbs:8.0f} {100 * gbs / copy_gbs:6.1f}% | "
              f"{t_torch * 1e3:9.1f} {t_torch / t_triton:12.2f}")


class LayerStack:
    """Llama-shaped decoder layers (random weights, no RoPE, no embeddings) that run one
    decode step through the dispatching kernels: the path the model takes."""

    def __init__(self, s: Shapes, batch: int, dtype, device, kernels):
        import torch

        self.s, self.batch, self.kernels = s, batch, kernels
        h, inter, D = s.model_hidden, s.model_intermediate, s.model_hidden // s.model_heads
        self.head_dim = D
        self.q_out, self.kv_out = s.model_heads * D, s.model_kv_heads * D

        def w(o, i):
            return torch.randn(o, i, dtype=dtype, device=device) / i ** 0.5
        self.layers = []
        for _ in range(s.model_layers):
            k_cache, v_cache, tables = paged_cache(batch, s.model_context, s.model_kv_heads, D, 16, dtype, device)
            self.layers.append(dict(
                qkv=w(self.q_out + 2 * self.kv_out, h), o=w(h, self.q_out), gate_up=w(2 * inter, h), down=w(h, inter),
                lora_qkv=lora_weights(s.model_adapters, h, [self.q_out, self.kv_out, self.kv_out], 16, dtype, device),
                lora_o=lora_weights(s.model_adapters, self.q_out, [h], 16, dtype, device),
                lora_gate_up=lora_weights(s.model_adapters, h, [inter, inter], 16, dtype, device),
                lora_down=lora_weights(s.model_adapters, inter, [h], 16, dtype, device),
                k_cache=k_cache, v_cache=v_cache, tables=tables))
        self.context_lens = torch.full((batch,), s.model_context, dtype=torch.int32, device=device)
        # the new token goes to the last slot of each sequence's context
        last = (s.model_context - 1) // 16
        self.slot_mapping = self.layers[0]["tables"][:, last] * 16 + (s.model_context - 1) % 16
        self.h = torch.randn(batch, h, dtype=dtype, device=device)

    def step(self, meta):
        import torch.nn.functional as F

        add_lora, store_kv = self.kernels.add_lora, self.kernels.store_kv
        paged_attention_decode = self.kernels.paged_attention_decode
        s, B, D = self.s, self.batch, self.head_dim
        h = self.h
        for L in self.layers:
            x = F.rms_norm(h, (h.shape[-1],))
            qkv = x @ L["qkv"].T
            add_lora(qkv, x, *L["lora_qkv"], [(0, self.q_out), (self.q_out, self.kv_out),
                                              (self.q_out + self.kv_out, self.kv_out)], meta)
            q, k, v = qkv.split([self.q_out, self.kv_out, self.kv_out], dim=-1)
            store_kv(k.view(B, -1, D), v.view(B, -1, D), L["k_cache"], L["v_cache"], self.slot_mapping)
            attn = paged_attention_decode(q.view(B, -1, D), L["k_cache"], L["v_cache"], L["tables"],
                                          self.context_lens, s.model_context, D ** -0.5).reshape(B, -1)
            o = attn @ L["o"].T
            add_lora(o, attn, *L["lora_o"], [(0, o.shape[1])], meta)
            h = h + o
            x = F.rms_norm(h, (h.shape[-1],))
            gu = x @ L["gate_up"].T
            inter = s.model_intermediate
            add_lora(gu, x, *L["lora_gate_up"], [(0, inter), (inter, inter)], meta)
            a = F.silu(gu[:, :inter]) * gu[:, inter:]
            d = a @ L["down"].T
            add_lora(d, a, *L["lora_down"], [(0, d.shape[1])], meta)
            h = h + d
        return h


def profile_step(stack: LayerStack, meta, device: str) -> None:
    """Per-kernel time of one decode step with adapters (eager, so kernels are named)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    stack.step(meta)
    with profile(activities=activities) as prof:
        stack.step(meta)
        if device == "cuda":
            torch.cuda.synchronize()
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=15))


def bench_model(shapes: Shapes, timer: Timer, device: str, launch, profile: bool = False) -> None:
    import torch

    from loraserve.kernels import select_kernels

    kernels = select_kernels(device, launch=launch)     # what the engine would pick here

    dtype = torch.bfloat16
    n = shapes.model_adapters
    print(f"\n## Llama-3.2-1B-shaped decode step: {shapes.model_layers} layers, hidden {shapes.model_hidden}, "
          f"context {shapes.model_context}, {n} adapters of rank 16 on q,k,v,o,gate,up,down")
    print(f"{'batch':>5} | {'no adapters ms':>14} {f'{n} adapters ms':>15} {'overhead':>9}")
    for batch in shapes.model_batches:
        stack = LayerStack(shapes, batch, dtype, device, kernels)
        with_lora = kernels.lora_meta([t % n for t in range(batch)], [16] * n, device)
        without = kernels.lora_meta([-1] * batch, [16] * n, device)
        t_base = timer(lambda stack=stack: stack.step(without), graph=True)
        t_lora = timer(lambda stack=stack: stack.step(with_lora), graph=True)
        print(f"{batch:>5} | {t_base:14.3f} {t_lora:15.3f} {100 * (t_lora / t_base - 1):8.1f}%")
        if profile:
            profile_step(stack, with_lora, device)
        del stack
        if timer.cuda:
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernels",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; on CPU through the Triton interpreter")
    parser.add_argument("--only", choices=["lora", "ranks", "attention", "model"], help="run one section")
    parser.add_argument("--profile", action="store_true",
                        help="after each model-step row, torch.profiler's kernel table of one step with adapters")
    parser.add_argument("--tune", action="store_true",
                        help="first sweep the SGMV launch block sizes; print them and use the best")
    args = parser.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("benchmarks/kernels.py measures GPU kernels against the GPU's memory bandwidth and needs CUDA; "
              "no CUDA device here, so nothing was measured. `--smoke` runs tiny shapes on CPU "
              "(Triton interpreter) to check that the script works.")
        return 0
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"        # before the first kernel is decorated
    try:
        import triton  # noqa: F401
    except ImportError:
        print("triton is not installed: `pip install triton`")
        return 0
    device = "cuda" if cuda else "cpu"
    shapes = SMOKE if args.smoke else Shapes()
    timer = Timer(cuda)
    name = torch.cuda.get_device_name() if cuda else "CPU (interpreter: timings mean nothing)"
    copy_gbs = copy_bandwidth(timer, device)
    print(f"# {name}: measured copy bandwidth {copy_gbs:.0f} GB/s")
    torch.manual_seed(0)
    from loraserve.kernels import DEFAULT_LAUNCH

    with torch.inference_mode():
        launch = tune(timer, device) if args.tune else DEFAULT_LAUNCH
        if args.only in (None, "lora"):
            bench_lora(shapes, timer, device, copy_gbs, launch)
        if args.only in (None, "ranks"):
            bench_rank_mix(shapes, timer, device, launch)
        if args.only in (None, "attention"):
            bench_attention(shapes, timer, device, copy_gbs)
        if args.only in (None, "model"):
            bench_model(shapes, timer, device, launch, args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
