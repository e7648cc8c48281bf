"""The C++ CPU RMSNorm op (kernels/cpu_rms_norm.cpp) against torch's ops for the same
norm (cpu_rms_norm.rms_norm_ref: what the model ran before), one call at decode and
prefill row counts of SmolLM2's hidden size, in the same run.

    python -m benchmarks.rms_norm_cpu            # hidden 576, rows 1-512, bf16 and fp32
    python -m benchmarks.rms_norm_cpu --smoke    # tiny: checks that the script runs

The two are timed alternately, median of --reps; the ratio is torch's time over the op's.
"""

from __future__ import annotations

import argparse

import torch

from loraserve.kernels import cpu_rms_norm

from .cpu_attention import time_pair


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=576, help="row length (default: SmolLM2-135M's 576)")
    ap.add_argument("--reps", type=int, default=200, help="timed calls of each (default: 200)")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    if cpu_rms_norm.extension() is None:
        raise SystemExit("the C++ op does not build here")
    rows_list, reps = ([1, 8], 3) if args.smoke else ([1, 64, 128, 512], args.reps)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, hidden {args.hidden}")
    print("| dtype | rows | op us | torch ops us | torch / op |")
    print("|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        for rows in rows_list:
            x = torch.randn(rows, args.hidden).to(dtype)
            w = (1 + 0.1 * torch.randn(args.hidden)).to(dtype)
            fns = {"op": lambda: cpu_rms_norm.rms_norm(x, w, 1e-5),
                   "ref": lambda: cpu_rms_norm.rms_norm_ref(x, w, 1e-5)}
            t = {name: ms * 1e3 for name, ms in time_pair(fns, reps).items()}
            print(f"| {str(dtype).removeprefix('torch.')} | {rows} | {t['op']:.1f} | {t['ref']:.1f} "
                  f"| {t['ref'] / t['op']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
