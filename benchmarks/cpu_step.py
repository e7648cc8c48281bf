"""One decode step of the engine against this machine's roofline, measured in one run.

    python -m benchmarks.cpu_step                          # bf16, batch 64 and 128, 8 adapters
    python -m benchmarks.cpu_step --dtypes float32,bfloat16 --batches 64
    python -m benchmarks.cpu_step --smoke                  # tiny: checks that the script runs

For each dtype and batch it prints the achieved time of a full engine step (schedule,
inputs, forward, logits, sampling, bookkeeping) with the batch all in decode at a given
context, beside the step's two floors:
- compute: the step's FLOPs (every linear layer incl. the LM head, attention over the
  context, the LoRA shrink and expand) at the matmul peak measured here, in this run;
- memory: the bytes a step must read at least (the base weights once, the K/V of every
  sequence, the adapters in the batch at their rank) at the read bandwidth measured here.
The floor is the larger of the two. The step is split into forward (the layers), logits
(final projection) and host (everything else: Python, scheduling, sampling).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch

from loraserve import LLM, SamplingParams
from loraserve.model.loader import load_config, resolve_model

from .synthetic import module_shapes, random_prompts, write_adapter


@dataclass(frozen=True)
class Machine:
    peak_gflops: float      # matmul, this dtype
    read_gbs: float         # streaming read of a tensor far larger than the caches


def best_s(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_machine(dtype: torch.dtype, smoke: bool) -> Machine:
    n = 512 if smoke else 2048
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    peak = 2 * n ** 3 / best_s(lambda: a @ b, 5) / 1e9
    big = torch.ones((16 if smoke else 512) << 18, dtype=torch.float32)   # 512 MiB
    read = big.numel() * 4 / best_s(big.sum, 5) / 1e9
    return Machine(peak, read)


@dataclass(frozen=True)
class StepCost:
    flops: float
    bytes: float


def decode_step_cost(cfg, batch: int, context: int, rank: int, num_adapters: int, dtype: torch.dtype) -> StepCost:
    """What one decode step of `batch` sequences at `context` must compute and read."""
    size = torch.finfo(dtype).bits // 8
    shapes = module_shapes(cfg)
    layer_params = sum(i * o for i, o in shapes.values())
    head_params = cfg.hidden_size * cfg.vocab_size
    weight_params = cfg.num_hidden_layers * layer_params + head_params
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn_flops = 4 * context * cfg.num_attention_heads * head_dim * cfg.num_hidden_layers   # q.k and p.v
    lora_params = cfg.num_hidden_layers * sum(rank * (i + o) for i, o in shapes.values())
    flops = batch * (2 * weight_params + attn_flops + (2 * lora_params if num_adapters else 0))
    kv_bytes = batch * context * 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * size
    adapter_bytes = num_adapters * lora_params * size
    return StepCost(flops, weight_params * size + kv_bytes + adapter_bytes)


class StepTimer:
    """Wall time of the engine's forward and logits calls, to split a step: the rest of the
    step is host work. Wraps the runner's model methods for the benchmark's own engine."""

    def __init__(self, model):
        self.forward = self.logits = 0.0
        self._wrap(model, "forward", "forward")
        self._wrap(model, "compute_logits", "logits")

    def _wrap(self, model, method: str, field: str) -> None:
        inner = getattr(model, method)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            setattr(self, field, getattr(self, field) + time.perf_counter() - start)
            return out
        setattr(model, method, timed)


def time_decode(llm: LLM, batch: int, context: int, adapters: list[str | None], steps: int, vocab: int,
                profile: bool = False) -> dict:
    """Fill the engine with `batch` sequences at `context`, then time `steps` decode steps
    (and with `profile`, print torch.profiler's op table of 3 more)."""
    engine = llm.engine
    prompts = random_prompts(batch, context, context, vocab, seed=batch)
    # sequences prefilled early decode while the others prefill: room for that, aborted after
    params = SamplingParams(max_tokens=steps + 256, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(prompt, params, adapters[i % len(adapters)])
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.requests.values()):
        engine.step()
    engine.step()                                            # first decode: warm
    timer = StepTimer(engine.runner.model)
    walls = []
    for _ in range(steps):
        start = time.perf_counter()
        result = engine.step()
        walls.append(time.perf_counter() - start)
        assert result.num_scheduled_tokens == batch, f"step of {result.num_scheduled_tokens} tokens, expected a full batch of {batch}"
    engine.runner.model.__dict__.pop("forward")                 # unwrap
    engine.runner.model.__dict__.pop("compute_logits")
    lora_ms = lora_op_ms(engine) if any(adapters) else 0.0
    if profile:
        print_profile(engine, batch)
    for request_id in list(engine.requests):
        engine.abort(request_id)
    wall = statistics.median(walls)
    return dict(wall=wall, best=min(walls), forward=timer.forward / steps, logits=timer.logits / steps, lora=lora_ms)


def lora_op_ms(engine, steps: int = 3) -> float:
    """ms a decode step spends in the C++ LoRA op (its profiler row), over `steps` steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            engine.step()
    rows = [e for e in prof.key_averages() if e.key == "loraserve::sgmv_cpu"]
    return sum(e.cpu_time_total for e in rows) / steps / 1e3


def print_profile(engine, batch: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            engine.step()
    print(f"\n3 decode steps of batch {batch}:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", default="bfloat16", help="comma-separated dtypes to measure")
    p.add_argument("--batches", default="64,128", help="comma-separated decode batch sizes")
    p.add_argument("--context", type=int, default=128, help="tokens in each sequence's context")
    p.add_argument("--num-adapters", type=int, default=8, help="distinct rank-r adapters, round-robin (0: base only)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of every adapter")
    p.add_argument("--lora-dtypes", default="auto", help="comma-separated adapter slot dtypes (auto, int8): one row each")
    p.add_argument("--steps", type=int, default=8, help="decode steps timed per configuration (the median counts)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded SmolLM2)")
    p.add_argument("--profile", action="store_true", help="also print the op table of 3 decode steps per batch")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the script runs")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        args.batches, args.context, args.steps, args.num_adapters = "4", 16, 2, min(args.num_adapters, 2)
    source = resolve_model(args.model)
    cfg = load_config(source.local_dir)
    batches = [int(b) for b in args.batches.split(",")]
    print(f"{source.model_id}: decode steps at context {args.context}, {args.num_adapters} adapters of rank "
          f"{args.rank} round-robin, {torch.get_num_threads()} threads, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        names = [f"a{i}" for i in range(args.num_adapters)]
        dirs = {n: write_adapter(f"{tmp}/{n}", cfg, source.model_id, args.rank, seed=i) for i, n in enumerate(names)}
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            machine = measure_machine(dtype, args.smoke)
            print(f"\n{dtype_name}: matmul peak {machine.peak_gflops:.0f} GFLOP/s, read bandwidth {machine.read_gbs:.1f} GB/s")
            print("| slots | batch | step ms (best) | forward ms | logits ms | host ms | LoRA op ms (share) "
                  "| compute floor ms | memory floor ms | step / floor | tok/s |")
            print("|---|---|---|---|---|---|---|---|---|---|---|")
            for lora_dtype in args.lora_dtypes.split(","):
                run_rows(args, source, cfg, dirs, names, batches, machine, dtype, dtype_name, lora_dtype)


def run_rows(args, source, cfg, dirs, names, batches, machine, dtype, dtype_name, lora_dtype) -> None:
    """One engine with `lora_dtype` slots, a row per batch size."""
    llm = LLM(model=args.model, dtype=dtype_name, max_loras=max(1, args.num_adapters), lora_dtype=lora_dtype,
              max_lora_rank=args.rank, max_num_seqs=max(batches), enable_prefix_caching=False)
    for n, d in dirs.items():
        llm.add_adapter(n, d)
    for batch in batches:
        t = time_decode(llm, batch, args.context, names or [None], args.steps, cfg.vocab_size, args.profile)
        cost = decode_step_cost(cfg, batch, args.context + args.steps // 2, args.rank,
                                min(args.num_adapters, batch), dtype)
        compute_ms = cost.flops / machine.peak_gflops / 1e6
        memory_ms = cost.bytes / machine.read_gbs / 1e6
        wall = t["wall"] * 1e3
        host = wall - (t["forward"] + t["logits"]) * 1e3
        print(f"| {lora_dtype} | {batch} | {wall:.1f} ({t['best'] * 1e3:.1f}) | {t['forward'] * 1e3:.1f} "
              f"| {t['logits'] * 1e3:.1f} | {host:.1f} | {t['lora']:.1f} ({100 * t['lora'] / wall:.0f}%) "
              f"| {compute_ms:.1f} | {memory_ms:.1f} | {wall / max(compute_ms, memory_ms):.1f}x "
              f"| {batch / t['wall']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
