"""The base projections' matmul on this CPU, each candidate format against F.linear in the
same run: what loraserve/model/base_weights.py picks, and the losers' figures.

    python -m benchmarks.matmul_cpu             # SmolLM2-135M shapes, M = 1, 64, 128
    python -m benchmarks.matmul_cpu --smoke     # tiny: checks that the script runs

Candidates: bf16 weights pre-packed once for oneDNN (`mkldnn._linear_pointwise`), fp32
weights pre-packed for MKL (`mkl._mkl_linear`), and the served weight-only formats of
--quantization: int8 per channel (`_weight_int8pack_mm`) and int4 in groups
(`_weight_int4pack_mm_for_cpu`), built as base_weights.py builds them. Each call is timed
alternately with F.linear (median of rounds); M is the step's token count, so decode
batches are the shapes that matter.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from loraserve.model.base_weights import Int4Weight, Int8Weight
from loraserve.model.quantize import quantize_int4, quantize_int8

SHAPES = {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576), "lm_head": (576, 49152)}
SMOKE_SHAPES = {"qkv": (64, 96), "down": (128, 64)}


def candidates(w: torch.Tensor, m: int) -> dict:
    """name -> a call x -> y, for the formats that exist for this dtype."""
    out = {"F.linear": lambda x: F.linear(x, w)}
    if w.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        packed = torch.ops.mkldnn._reorder_linear_weight(w, m)
        out["oneDNN packed"] = lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    # the served quantized formats (--quantization), as the engine builds them
    out["int8 weight-only"] = Int8Weight(quantize_int8(w), None, w.dtype)
    out["int4 weight-only"] = Int4Weight(quantize_int4(w), None, w.dtype)
    if w.dtype == torch.float32 and torch.backends.mkl.is_available():
        packed = torch.ops.mkl._mkl_reorder_linear_weight(w, m)
        out["MKL packed"] = lambda x: torch.ops.mkl._mkl_linear(x, packed, w, None, m)
    return out


def median_us(fns: dict, x: torch.Tensor, rounds: int, reps: int) -> dict:
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn(x)
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(reps):
                fn(x)
            times[name].append((time.perf_counter() - start) / reps * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.matmul_cpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,64,128", help="comma-separated M (tokens in the step)")
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    shapes, reps = (SMOKE_SHAPES, 2) if args.smoke else (SHAPES, 20)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; median us per call, ratio = F.linear / candidate")
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        print(f"\n| {dtype_name} | M | F.linear us | candidate | us | F.linear / candidate | GFLOP/s F.linear |")
        print("|---|---|---|---|---|---|---|")
        for m in (int(r) for r in args.rows.split(",")):
            for name, (k, n) in shapes.items():
                w = (torch.randn(n, k) * 0.02).to(dtype)
                x = torch.randn(m, k).to(dtype)
                us = median_us(candidates(w, m), x, args.rounds, reps)
                base = us.pop("F.linear")
                for cand, t in us.items():
                    print(f"| {name} | {m} | {base:.1f} | {cand} | {t:.1f} | {base / t:.2f}x | {2 * m * k * n / base / 1e3:.0f} |")


if __name__ == "__main__":
    main()
