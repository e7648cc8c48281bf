"""`loraserve` command line: subcommands share one set of engine flags built from
EngineConfig, so a flag means the same thing everywhere."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from .config import DTYPES, EngineConfig

ENGINE_FLAGS = {
    "model": "local HF directory, .gguf file or hub id (default: the embedded SmolLM2-135M-Instruct, no network needed)",
    "dtype": "weights and activations dtype; auto = bfloat16 (fast on CPUs with AMX and on GPUs)",
    "device": "cpu, cuda, or auto (cuda when available)",
    "seed": "seed for requests that do not set their own",
    "max_model_len": "longest prompt + output in tokens (default: the model's, at most 4096)",
    "block_size": "tokens per KV-cache block",
    "kv_cache_memory": "bytes of memory for the KV-cache block pool",
    "num_kv_blocks": "exact number of KV blocks (overrides --kv-cache-memory)",
    "max_num_seqs": "most requests in one engine step",
    "max_num_batched_tokens": "most tokens in one engine step; longer prompts are prefilled in chunks",
    "enable_prefix_caching": "reuse KV blocks of identical prompt prefixes under the same adapter",
    "max_loras": "adapter slots on the device: distinct adapters that can run in one step",
    "max_lora_rank": "largest LoRA rank accepted; slot buffers are sized to it",
    "max_cpu_loras": "adapters kept loaded in CPU memory (default 4 x --max-loras)",
    "adapter_dir": "directory of the durable adapter store (default: ~/.cache/loraserve/adapters)",
    "cache_dir": "directory for converted models (default: ~/.cache/loraserve)",
}


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = ENGINE_FLAGS[f.name] + (f" (default: {f.default})" if f.default is not None else "")
        if f.type in ("bool", bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        elif f.name == "dtype":
            group.add_argument(flag, choices=DTYPES, default=f.default, help=help_text)
        else:
            kind = int if "int" in str(f.type) else str
            group.add_argument(flag, type=kind, default=f.default, help=help_text)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)})


def parse_adapter(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraserve", description="Serve one base LLM and many LoRA adapters.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one or more prompts, offline",
                         description="Generate text offline, each prompt under the same adapter (or none).")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for a batch")
    gen.add_argument("--adapter", action="append", type=parse_adapter, default=[], metavar="NAME=PATH",
                     help="load a PEFT adapter directory under NAME; the first one given is used")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    gen.add_argument("--max-tokens", type=int, default=128, help="tokens to generate per prompt (default: 128)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    gen.add_argument("-v", "--verbose", action="store_true", help="log engine set-up")
    add_engine_args(gen)
    from loraserve.api.cli import add_keys_parser, add_serve_parser

    add_serve_parser(sub, add_engine_args, parse_adapter)
    add_keys_parser(sub)
    return parser


def run_generate(args: argparse.Namespace) -> int:
    from .llm import LLM
    from .sampling_params import SamplingParams

    config = engine_config(args)
    llm = LLM(**dataclasses.asdict(config))
    for name, path in args.adapter:
        llm.add_adapter(name, path)
    adapter = args.adapter[0][0] if args.adapter else None
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p)
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params, adapters=adapter)
    else:
        outs = llm.generate(args.prompt, params, adapters=adapter)
    for out in outs:
        print(out.text)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            return run_generate(args)
        if args.command == "serve":
            from loraserve.api.cli import run_serve
            return run_serve(args, engine_config)
        if args.command == "keys":
            from loraserve.api.cli import run_keys
            return run_keys(args)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
