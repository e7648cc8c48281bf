"""What structured outputs cost the batch: throughput and inter-token latency of the same
workload with no request under a grammar, and with half of them under a json_schema.

    python -m benchmarks.structured_throughput [--requests 16] [--max-tokens 64] [--rounds 2] [--write]

The engine (embedded SmolLM2, base model and two random adapters, requests spread over
the three) runs both workloads in the same process, alternately, `--rounds` times; the
best round of each is reported (the machine may be shared). Every request generates
exactly --max-tokens tokens: the unconstrained ones ignore EOS, and the schema (an
array of at least 60 short strings) cannot close earlier, so both workloads do the same
work and the ratio is the grammar's price: each constrained request's matcher is
compiled at admission (timed too), its mask computed beside the forward pass and applied
to its own row. Inter-token latency: gaps between a request's consecutive tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from loraserve import LLM, SamplingParams
from loraserve.grammar import GrammarCompiler

SCHEMA = {"type": "object", "properties": {"words": {"type": "array", "minItems": 60,
                                                     "items": {"type": "string", "maxLength": 12}}},
          "required": ["words"], "additionalProperties": False}
PROMPT = [{"role": "user", "content": "List as many animal names as you can, as JSON."}]


def write_adapters(llm: LLM, root: str) -> list[str | None]:
    from safetensors.torch import save_file

    spec, names = llm.engine.spec, []
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for layer in range(spec.num_hidden_layers):
            for module in ("q_proj", "v_proj"):
                fan_in, fan_out = spec.module_shape(module)
                prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(8, fan_in, generator=g) / fan_in ** 0.5
                tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, 8, generator=g) * 0.05
        path = os.path.join(root, f"a{i}")
        os.makedirs(path)
        save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16,
                       "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": spec.base_model_id}, f)
        llm.add_adapter(f"a{i}", path)
        names.append(f"a{i}")
    return [None, *names]


class Timed:
    """A processor wrapper adding up the time the sampler spends in apply (waiting for the
    mask and masking the row): the grammar's share of the engine thread."""

    total_s = 0.0

    def __init__(self, inner):
        self.inner = inner

    def apply(self, output_token_ids, logits):
        start = time.perf_counter()
        self.inner.apply(output_token_ids, logits)
        Timed.total_s += time.perf_counter() - start

    def accept(self, token_id):
        self.inner.accept(token_id)


def run(llm: LLM, compiler: GrammarCompiler, grammar: str, adapters, args, constrained_share: float) -> dict:
    engine, ids = llm.engine, llm.apply_chat_template(PROMPT)
    arrivals, stamps, start, num_steps = {}, {}, time.perf_counter(), 0
    Timed.total_s = 0.0
    for i in range(args.requests):
        constrained = i < args.requests * constrained_share
        processors = [Timed(compiler.processor(grammar))] if constrained else []
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=not constrained,
                                logits_processors=processors)
        rid = engine.add_request(ids, params, adapters[i % len(adapters)])
        arrivals[rid], stamps[rid] = time.perf_counter(), []
    tokens = 0
    while engine.has_unfinished():
        num_steps += 1
        for out in engine.step():
            stamps[out.request_id].append(time.perf_counter())
            tokens += len(out.delta_token_ids)
            if out.finished and out.finish_reason != "length":
                raise RuntimeError(f"{out.request_id} ended early ({out.finish_reason}): the workloads would differ")
    wall = time.perf_counter() - start
    gaps = [b - a for s in stamps.values() for a, b in zip(s, s[1:])]
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
            "itl_ms_p50": 1e3 * statistics.median(gaps), "itl_ms_mean": 1e3 * statistics.fmean(gaps),
            "mask_ms_per_step": 1e3 * Timed.total_s / num_steps}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.structured_throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two workloads; best is kept")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--write", action="store_true", help="put the table into benchmarks/RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        llm = LLM(dtype=args.dtype, max_loras=2, max_lora_rank=8, max_model_len=1024, adapter_dir=root)
        adapters = write_adapters(llm, root)
        compiler = GrammarCompiler(llm.tokenizer, llm.engine.hf_config.vocab_size)
        grammar = compiler.json_schema(SCHEMA)
        compiler.check(grammar)                              # the one-time tokenizer set-up, untimed
        small = argparse.Namespace(requests=2, max_tokens=4)
        run(llm, compiler, grammar, adapters, small, 0.5)    # warm-up
        best = {}
        for _ in range(args.rounds):
            for name, share in (("none", 0.0), ("half json_schema", 0.5)):
                result = run(llm, compiler, grammar, adapters, args, share)
                if name not in best or result["tok_s"] > best[name]["tok_s"]:
                    best[name] = result
    table = report(best, args)
    print(table)
    if args.write:
        from .results_md import write_section

        write_section(os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"),
                      "structured_throughput.py", table)


def report(best: dict, args) -> str:
    none, half = best["none"], best["half json_schema"]
    lines = [f"## Structured outputs: half the requests under a json_schema vs none "
             f"(benchmarks/structured_throughput.py)\n",
             f"{args.requests} requests x {args.max_tokens} tokens, base + 2 adapters, greedy, {args.dtype}, "
             f"{torch.get_num_threads()} torch threads; best of {args.rounds} alternated rounds.\n",
             "| workload | output tok/s | ITL p50 ms | ITL mean ms | sampler time in grammar masks, ms/step |",
             "|---|---|---|---|---|"]
    for name, r in best.items():
        lines.append(f"| {name} | {r['tok_s']:.1f} | {r['itl_ms_p50']:.1f} | {r['itl_ms_mean']:.1f} | "
                     f"{r['mask_ms_per_step']:.2f} |")
    lines.append(f"\nthroughput ratio (half json_schema / none): **{half['tok_s'] / none['tok_s']:.3f}**; "
                 f"ITL p50 ratio: **{half['itl_ms_p50'] / none['itl_ms_p50']:.3f}**")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
