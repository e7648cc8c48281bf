"""Offline multi-LoRA throughput: loraserve vs HF transformers + PEFT, same work, same run.

128 requests, 32 synthetic rank-16 adapters on all seven projections (round-robin),
prompts of 32-96 tokens, 64 generated tokens each (ignore_eos), all submitted at once.
HF+PEFT runs batches of 32 that mix adapters through generate's `adapter_names=`.
Prints tokens/s for both and their ratio per dtype, plus loraserve's base-model
throughput (no adapters, same engine, alternating with the LoRA runs) for the LoRA
overhead ratio. Adapters are loaded before timing: cold loads are adapter_scaling.py's.

    python -m benchmarks.offline_throughput                 # both dtypes, with HF+PEFT
    python -m benchmarks.offline_throughput --dtypes bfloat16 --skip-hf
    python -m benchmarks.offline_throughput --random-model llama-3.2-1b --dtypes bfloat16   # a GPU
    python -m benchmarks.offline_throughput --adapter-kinds lora,dora,embed_head --skip-hf

--adapter-kinds measures adapters of other kinds (DoRA; LoRA on embed_tokens and lm_head
as well as the projections) on the same prompts and plan, each against plain LoRA.

--quantizations and --lora-dtypes measure every base quantization x adapter-slot dtype
pair on the same workload, each against the unquantized base with model-dtype slots,
with the resident bytes of the base weights and of the slot pool, and how many adapters
of this rank a fixed slot budget (--slot-budget-mb) holds:

    python -m benchmarks.offline_throughput --dtypes bfloat16 --skip-hf --quantizations none,int8,int4 --lora-dtypes auto,int8

On CUDA both systems run on the GPU; loraserve replays CUDA graphs for decode unless
--enforce-eager (run both to see what the graphs buy).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from loraserve import LLM, SamplingParams
from loraserve.model.loader import load_config, resolve_model

from .synthetic import ADAPTER_KINDS, MODEL_PRESETS, random_prompts, write_adapter, write_random_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.offline_throughput",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-requests", type=int, default=128, help="requests submitted at once")
    p.add_argument("--num-adapters", type=int, default=32, help="distinct adapters, assigned round-robin")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of every adapter")
    p.add_argument("--max-lora-rank", type=int, default=None,
                   help="the engine's slot capacity (default: --rank); larger shows what smaller adapters pay")
    p.add_argument("--min-prompt", type=int, default=32, help="shortest prompt, tokens")
    p.add_argument("--max-prompt", type=int, default=96, help="longest prompt, tokens")
    p.add_argument("--gen-tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated dtypes to measure")
    p.add_argument("--hf-batch", type=int, default=32, help="HF+PEFT generate batch size")
    p.add_argument("--skip-hf", action="store_true", help="measure loraserve only")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--rounds", type=int, default=2, help="alternating LoRA/base rounds; the best of each counts")
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded SmolLM2)")
    p.add_argument("--random-model", choices=sorted(MODEL_PRESETS), default=None,
                   help="random weights of this model's shape, with the embedded model's tokenizer")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory for --random-model (default: the embedded model's)")
    p.add_argument("--enforce-eager", action="store_true", help="CUDA: decode without CUDA graphs")
    p.add_argument("--adapter-kinds", default="lora",
                   help=f"comma-separated adapter kinds to measure, each against plain LoRA: {', '.join(ADAPTER_KINDS)}")
    p.add_argument("--quantizations", default="none",
                   help="comma-separated base quantizations to measure (none, int8, int4, auto), each against none")
    p.add_argument("--lora-dtypes", default="auto",
                   help="comma-separated adapter slot dtypes to measure (auto = the model dtype, int8)")
    p.add_argument("--slot-budget-mb", type=float, default=256.0,
                   help="slot memory for the 'adapters that fit' column (MB)")
    p.add_argument("--profile", action="store_true",
                   help="also print torch.profiler's op table for 3 decode steps, with and without adapters")
    args = p.parse_args(argv)
    args.kinds = [k for k in args.adapter_kinds.split(",") if k]
    if any(k not in ADAPTER_KINDS for k in args.kinds):
        p.error(f"--adapter-kinds takes some of {', '.join(ADAPTER_KINDS)}, got {args.adapter_kinds!r}")
    if "lora" not in args.kinds:
        args.kinds.insert(0, "lora")               # the reference every other kind is measured against
    if args.max_lora_rank is not None and args.max_lora_rank < args.rank:
        p.error(f"--max-lora-rank {args.max_lora_rank} is below --rank {args.rank}: the slots could not hold the adapters")
    return args


def run_loraserve(dtype, prompts, adapter_dirs, plan, args, **engine) -> tuple[float, float]:
    """(LoRA tok/s, base tok/s) on one engine: every adapter is loaded first (cold loads
    are adapter_scaling.py's subject), then the mixed-adapter and the no-adapter workloads
    alternate for `--rounds` rounds and the best of each counts, so drift in the machine
    or the process hits both alike."""
    # prefix caching off: rounds repeat the same prompts, which must not hit cached blocks
    llm = LLM(model=args.model, dtype=dtype, max_loras=max(1, len(adapter_dirs)), max_lora_rank=args.max_lora_rank or args.rank,
              max_num_seqs=args.num_requests, enable_prefix_caching=False, enforce_eager=args.enforce_eager, **engine)
    for name, path in adapter_dirs.items():
        llm.add_adapter(name, path)
    params = SamplingParams(max_tokens=args.gen_tokens, temperature=0, ignore_eos=True)
    warm = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    names = sorted(set(plan))
    llm.generate(prompts[: len(names)], warm, adapters=names, use_tqdm=False)   # load every adapter
    best = {"lora": 0.0, "base": 0.0}
    for _ in range(args.rounds):
        for kind, adapters in (("lora", plan), ("base", [None] * len(plan))):
            start = time.perf_counter()
            outs = llm.generate(prompts, params, adapters=adapters, use_tqdm=False)
            rate = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)
            best[kind] = max(best[kind], rate)
    if args.profile:
        for kind, adapters in (("lora", plan), ("base", [None] * len(plan))):
            profile_decode(llm, prompts, adapters, kind, dtype)
    args.last_stats = llm.engine.stats()
    return best["lora"], best["base"]


def profile_decode(llm, prompts, adapters, kind: str, dtype: str) -> None:
    """Where a decode step's time goes: run the prefills, then profile 3 full-batch steps."""
    from torch.profiler import ProfilerActivity, profile

    engine = llm.engine
    for p, a in zip(prompts, adapters):
        engine.add_request(p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), a)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.requests.values()):
        engine.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            engine.step()
    print(f"\n{dtype} {kind}: 3 decode steps of {len(prompts)} requests")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    while engine.has_unfinished():
        engine.step()


def run_hf_peft(model_dir, dtype, prompts, adapter_dirs, plan, args) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device).eval()
    names = list(adapter_dirs)
    model = PeftModel.from_pretrained(base, adapter_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapter_dirs[name], adapter_name=name)
    model.eval()
    pad = base.config.pad_token_id or 0
    generated = 0
    start = time.perf_counter()
    for i in range(0, len(prompts), args.hf_batch):
        batch, batch_plan = prompts[i : i + args.hf_batch], plan[i : i + args.hf_batch]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=batch_plan,
                                 max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens,
                                 do_sample=False, pad_token_id=pad)
        generated += (out.shape[1] - width) * len(batch)
    return generated / (time.perf_counter() - start)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.random_model:
            args.model = write_random_model(os.path.join(tmp, "model"), args.random_model,
                                            args.tokenizer or resolve_model(None).local_dir)
        source = resolve_model(args.model)
        model_dir = source.local_dir
        hf_config = load_config(model_dir)
        prompts = random_prompts(args.num_requests, args.min_prompt, args.max_prompt, hf_config.vocab_size)
        kind_dirs = {kind: {f"a{i}": write_adapter(os.path.join(tmp, kind, f"a{i}"), hf_config, source.model_id,
                                                   args.rank, seed=i, kind=kind) for i in range(args.num_adapters)}
                     for kind in args.kinds}
        adapter_dirs = kind_dirs["lora"]
        plan = [f"a{i % args.num_adapters}" for i in range(args.num_requests)]
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        graphs = "" if not torch.cuda.is_available() else (", eager" if args.enforce_eager else ", CUDA graphs")
        print(f"{source.model_id} on {device}{graphs}: "
              f"{args.num_requests} requests, {args.num_adapters} adapters of rank {args.rank}, "
              f"prompts {args.min_prompt}-{args.max_prompt} tokens, {args.gen_tokens} generated, "
              f"{torch.get_num_threads()} threads")
        print(f"{'dtype':<10} {'loraserve LoRA':>15} {'loraserve base':>15} {'LoRA/base':>10} {'HF+PEFT':>10} {'vs HF':>8}")
        for dtype in args.dtypes.split(","):
            lora, base = run_loraserve(dtype, prompts, adapter_dirs, plan, args)
            hf = None if args.skip_hf else run_hf_peft(model_dir, dtype, prompts, adapter_dirs, plan, args)
            hf_cols = f"{'-':>10} {'-':>8}" if hf is None else f"{hf:>10.1f} {lora / hf:>7.1f}x"
            print(f"{dtype:<10} {lora:>15.1f} {base:>15.1f} {lora / base:>10.2f} {hf_cols}", flush=True)
            for kind in args.kinds[1:]:
                other, other_base = run_loraserve(dtype, prompts, kind_dirs[kind], plan, args)
                print(f"  {kind:<12} {other:>11.1f} tok/s ({other_base:.1f} base in its engine): "
                      f"{other / lora:.2f}x plain LoRA's rate, LoRA/base {other / other_base:.2f}", flush=True)
            if args.quantizations != "none" or args.lora_dtypes != "auto":
                memory_matrix(dtype, prompts, adapter_dirs, plan, args)


def memory_matrix(dtype, prompts, adapter_dirs, plan, args) -> None:
    """Every quantization x slot dtype pair, against none x auto measured in the same run."""
    print(f"  {'quant':<6} {'slots':<6} {'LoRA tok/s':>10} {'base tok/s':>10} {'LoRA vs ref':>11} {'base vs ref':>11} "
          f"{'base MB':>8} {'slots MB':>8} {'adapters/budget':>15}")
    ref = None
    pairs = [("none", "auto")] + [(q, s) for q in args.quantizations.split(",") for s in args.lora_dtypes.split(",")
                                  if (q, s) != ("none", "auto")]
    for quant, slots in pairs:
        engine = {"quantization": quant} | ({} if slots == "auto" else {"lora_dtype": slots})
        lora, base = run_loraserve(dtype, prompts, adapter_dirs, plan, args, **engine)
        stats = args.last_stats
        ref = ref or (lora, base)
        per_adapter = stats.adapter_slot_bytes / stats.adapter_slots_total
        fit = int(args.slot_budget_mb * 2**20 // per_adapter)
        print(f"  {quant:<6} {slots:<6} {lora:>10.1f} {base:>10.1f} {lora / ref[0]:>10.2f}x {base / ref[1]:>10.2f}x "
              f"{stats.base_weight_bytes / 2**20:>8.1f} {stats.adapter_slot_bytes / 2**20:>8.1f} {fit:>15}", flush=True)


if __name__ == "__main__":
    main()
