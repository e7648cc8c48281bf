"""End-to-end A/B of the CPU attention paths: benchmarks.offline_throughput run in fresh
processes, alternately with the C++ paged-attention op (the torch backend's default when
it builds) and with the gather path it replaced (the op made unavailable, as on a machine
without a compiler), so drift in a shared machine hits both alike.

    python -m benchmarks.attention_ab --pairs 2 -- --dtypes bfloat16 --skip-hf

Arguments after `--` go to offline_throughput; its result lines are printed per run,
with the ratio of each pair.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

CHILD = """
import sys
from loraserve.kernels import cpu_paged_attention
if sys.argv[1] == "gather":
    cpu_paged_attention.extension = lambda: None     # select_kernels takes the gather path
from benchmarks.offline_throughput import main
main(sys.argv[2:])
"""


def run(path: str, args: list[str]) -> dict[str, tuple[float, float]]:
    out = subprocess.run([sys.executable, "-c", CHILD, path, *args], capture_output=True, text=True, check=True).stdout
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] in ("bfloat16", "float32", "float16"):
            rows[parts[0]] = (float(parts[1]), float(parts[2]))
    print(f"  {path:<6} " + "  ".join(f"{dt}: LoRA {lo:.1f} base {ba:.1f} tok/s" for dt, (lo, ba) in rows.items()),
          flush=True)
    return rows


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    child = argv[argv.index("--") + 1 :] if "--" in argv else []
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=2)
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    for i in range(args.pairs):
        order = ("gather", "op") if i % 2 == 0 else ("op", "gather")
        print(f"pair {i + 1} ({order[0]} first)")
        res = {path: run(path, child) for path in order}
        for dt in res["op"]:
            (lo, ba), (glo, gba) = res["op"][dt], res["gather"][dt]
            print(f"  {dt}: op/gather LoRA {lo / glo:.2f}x, base {ba / gba:.2f}x", flush=True)


if __name__ == "__main__":
    main()
