"""The engine's command-line pieces: one set of engine flags built from EngineConfig (so a
flag means the same thing in every subcommand), and the offline subcommands, `generate`
and `finetune`. The `loraserve` command itself is assembled in api/cli.py, above every
package, so no engine module imports the HTTP layer."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .config import DTYPES, KERNEL_BACKENDS, LORA_DTYPES, QUANTIZATIONS, EngineConfig

ENGINE_FLAGS = {
    "model": "local HF directory, .gguf file or hub id (default: the embedded SmolLM2-135M-Instruct, no network needed)",
    "dtype": "weights and activations dtype; auto = bfloat16 (fast on CPUs with AMX and on GPUs)",
    "quantization": "weight-only quantization of the base's linear layers (activations and adapters stay in "
                    "--dtype): int8 = per output channel, int4 = groups of 128/64/32 inputs, through torch's "
                    "packed CPU kernels; auto = a .gguf file's own precision (Q4_0/Q4_1 blocks served as they "
                    "are, Q8_0 as int8), none for other models; none = --dtype weights",
    "device": "cpu, cuda, or auto (cuda when available)",
    "seed": "seed for requests that do not set their own",
    "max_model_len": "longest prompt + output in tokens (default: the model's, at most 4096)",
    "block_size": "tokens per KV-cache block",
    "kv_cache_memory": "bytes of memory for the KV-cache block pool",
    "num_kv_blocks": "exact number of KV blocks (overrides --kv-cache-memory)",
    "max_num_seqs": "most requests in one engine step",
    "max_num_batched_tokens": "most tokens in one engine step; longer prompts are prefilled in chunks",
    "max_background_tokens": "while interactive requests are waiting or running, Batch API lines take at most "
                             "this many tokens of a step (a decode is one; prompts are chunked), so interactive "
                             "latency stays as without the batch; 0 = no cap",
    "background_hold_steps": "engine steps the --max-background-tokens cap holds after the last interactive "
                             "request, so the step a new request arrives behind is short too",
    "enable_prefix_caching": "reuse KV blocks of identical prompt prefixes under the same adapter",
    "max_loras": "adapter slots on the device: distinct adapters that can run in one step",
    "max_lora_rank": "largest LoRA rank accepted; slot buffers are sized to it",
    "lora_dtype": "dtype of the device adapter slots: auto = --dtype; int8 = int8 codes with a scale per rank "
                  "column, converted as the LoRA kernels read them: half of bf16's slot bytes, so twice the "
                  "--max-loras in the same memory; logits move by ~1%% of each adapter's effect",
    "max_module_copy_bytes": "largest modules_to_save copies (full embed_tokens / lm_head) one adapter may "
                             "carry, in fp32 bytes; larger adapters are refused at upload",
    "max_cpu_loras": "adapters kept loaded in CPU memory (default 4 x --max-loras)",
    "adapter_dir": "directory of the durable adapter store (default: ~/.cache/loraserve/adapters)",
    "cache_dir": "directory for converted models (default: ~/.cache/loraserve)",
    "enforce_eager": "on CUDA, run decode steps eagerly instead of replaying CUDA graphs captured at start "
                     "(graphs cost a few seconds of start-up and some GPU memory; no effect on CPU)",
    "kernel_backend": "kernels for LoRA and attention: auto = Triton on CUDA, else the torch paths (the C++ "
                      "LoRA op on CPU); triton on CPU runs them through Triton's interpreter (TRITON_INTERPRET=1, slow)",
}

CHOICES = {"dtype": DTYPES, "kernel_backend": KERNEL_BACKENDS, "quantization": QUANTIZATIONS,
           "lora_dtype": LORA_DTYPES}


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = ENGINE_FLAGS[f.name] + (f" (default: {f.default})" if f.default is not None else "")
        if f.type in ("bool", bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        elif f.name in CHOICES:
            group.add_argument(flag, choices=CHOICES[f.name], default=f.default, help=help_text)
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


def add_generate_parser(sub) -> None:
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


def add_finetune_parser(sub) -> None:
    from loraserve.adapters import DEFAULT_TENANT, LORA_MODULES
    from loraserve.adapters.finetune import BASE_LEARNING_RATE

    p = sub.add_parser("finetune", help="train a LoRA adapter on a JSONL file and register it in the adapter store",
                       description="Train a LoRA adapter of the base model (transformers' Trainer + PEFT, loss on "
                                   "the answers only) and register it in the adapter store under --name: a server "
                                   "on the same --adapter-dir serves it at once. Data: one JSON object a line, "
                                   "chat ({\"messages\": [...]}) or {\"prompt\": ..., \"completion\": ...}.")
    p.add_argument("--data", required=True, help="the JSONL training file")
    p.add_argument("--validation-data", default=None, metavar="FILE",
                   help="JSONL held-out data for the eval loss (default: --eval-fraction of --data)")
    p.add_argument("--name", required=True, help="the adapter's name in the store (a new version if it exists)")
    p.add_argument("--tenant", default=DEFAULT_TENANT,
                   help=f"the store namespace to register in (default: {DEFAULT_TENANT})")
    p.add_argument("--shared", action="store_true", help="register it visible, read-only, to every tenant")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default: 16)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: 2 x --rank)")
    p.add_argument("--epochs", type=int, default=None,
                   help="passes over the data (default: auto, 3 or more for small data, as the API's n_epochs)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"learning rate (default: auto, {BASE_LEARNING_RATE} times the API's auto "
                        "learning_rate_multiplier for this data)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="examples per step (default: auto, from the data's size and length, as the API's)")
    p.add_argument("--targets", default=",".join(LORA_MODULES),
                   help=f"comma-separated projections to adapt (default: all of {','.join(LORA_MODULES)})")
    p.add_argument("--use-dora", action="store_true",
                   help="train DoRA (weight-decomposed LoRA) instead of plain LoRA; served unmerged")
    p.add_argument("--max-seq-len", type=int, default=1024, help="longer examples are cut (default: 1024)")
    p.add_argument("--eval-fraction", type=float, default=0.1,
                   help="share of --data held out for the eval loss, without --validation-data (default: 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the LoRA init, shuffling and split (default: 0)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    for name in ("model", "adapter_dir", "cache_dir", "max_lora_rank"):
        default = getattr(EngineConfig, name)
        p.add_argument("--" + name.replace("_", "-"), type=int if name == "max_lora_rank" else str, default=default,
                       help=ENGINE_FLAGS[name] + (f" (default: {default})" if default is not None else ""))


def run_finetune(args: argparse.Namespace) -> int:
    import tempfile

    import torch
    from tqdm import tqdm

    from loraserve.adapters import AdapterStore, BaseModelSpec, default_store_root
    from loraserve.adapters.finetune import (BASE_LEARNING_RATE, FinetuneConfig, auto_hyperparameters,
                                             mean_example_tokens, train_lora)
    from loraserve.adapters.finetune_data import parse_jsonl

    from .model.loader import load_config, resolve_model

    if args.rank > args.max_lora_rank:
        raise ValueError(f"--rank {args.rank} exceeds --max-lora-rank {args.max_lora_rank}: a server could not "
                         f"load it; pass --max-lora-rank {args.rank} here and to `loraserve serve`")
    data = parse_jsonl(_read_bytes(args.data))
    auto = auto_hyperparameters(len(data.examples), mean_example_tokens(data.examples), args.epochs,
                                args.batch_size)
    lr = args.lr if args.lr is not None else BASE_LEARNING_RATE * auto.learning_rate_multiplier
    config = FinetuneConfig(rank=args.rank, alpha=args.alpha or 2.0 * args.rank, epochs=auto.n_epochs,
                            learning_rate=lr, batch_size=auto.batch_size, seed=args.seed,
                            targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
                            use_dora=args.use_dora,
                            max_seq_len=args.max_seq_len, eval_fraction=args.eval_fraction)
    print(f"training {len(data.examples)} examples: {config.epochs} epochs, batch size {config.batch_size}, "
          f"learning rate {config.learning_rate:g}", file=sys.stderr)
    validation = parse_jsonl(_read_bytes(args.validation_data)) if args.validation_data else None
    source = resolve_model(args.model, args.cache_dir)
    spec = BaseModelSpec.from_hf_config(load_config(source.local_dir), args.max_lora_rank, source.model_id)
    store = AdapterStore(args.adapter_dir or default_store_root(), spec)     # a bad store fails before training
    if args.threads:
        torch.set_num_threads(args.threads)
    bar = tqdm(desc=f"finetune {args.name}", unit="step", dynamic_ncols=True)

    def show(p) -> None:
        bar.total = p.total_steps
        bar.update(p.step - bar.n)
        shown = {"loss": f"{p.train_loss:.4f}"} if p.train_loss is not None else {"eval_loss": f"{p.eval_loss:.4f}"}
        bar.set_postfix(**shown, epoch=f"{p.epoch:.2f}", tok_s=f"{p.tokens_per_s:.0f}")

    with tempfile.TemporaryDirectory(prefix="loraserve-finetune-") as out:
        try:
            result = train_lora(source.local_dir, data, config, out, validation, on_progress=show,
                                base_model_id=source.model_id)
        finally:
            bar.close()
        record = store.register_dir(args.tenant, args.name, out, shared=args.shared)
    eval_text = f", eval loss {result.eval_loss:.4f} on {result.num_eval}" if result.eval_loss is not None else ""
    print(f"{record.name} version {record.version}: rank {record.rank}, {','.join(record.target_modules)}; "
          f"{result.steps} steps on {result.num_train} examples in {result.seconds:.0f} s, {result.trained_tokens} "
          f"tokens, train loss {result.train_loss:.4f}{eval_text}; stored in {store.root} (tenant {args.tenant})")
    return 0


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


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
