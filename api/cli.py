"""The `loraserve` command (and `python -m loraserve`): `generate` and `finetune` from the
engine (loraserve/cli.py), `serve`, `serve-ray` and `keys` from here. Engine flags come
from loraserve/cli.py's add_engine_args, so --model, --max-loras, --max-num-seqs and the
rest mean the same thing everywhere.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import time

from loraserve.cli import (add_engine_args, add_finetune_parser, add_generate_parser, engine_config, parse_adapter,
                           run_finetune, run_generate)

from .settings import DEFAULT_TENANT, ServerSettings

log = logging.getLogger("loraserve.api")


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API",
                       description="Serve one base model and its LoRA adapters over an OpenAI-compatible HTTP API "
                                   "(/v1/completions, /v1/chat/completions, /v1/models, /v1/adapters, vLLM's "
                                   "/v1/load_lora_adapter, /health, /metrics). With no arguments it serves the "
                                   "embedded SmolLM2-135M-Instruct on 127.0.0.1:8000. SIGTERM drains and exits 0.")
    add_server_flags(p)
    add_finetune_flags(p)
    add_batch_flags(p)
    add_engine_args(p)


def add_batch_flags(p: argparse.ArgumentParser) -> None:
    """/v1/batches (api/batches_routes.py)."""
    g = p.add_argument_group("batches")
    g.add_argument("--batch-concurrency", type=int, default=8, metavar="N",
                   help="Batch API requests running at once, all batches together; they run behind interactive "
                        "requests, which preempt them (default: 8; 0 turns the Batch API off)")


def add_finetune_flags(p: argparse.ArgumentParser) -> None:
    """/v1/files and /v1/fine_tuning/jobs (api/finetune_routes.py)."""
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--finetune-dir", default=None, metavar="DIR",
                   help="where training files and fine-tuning jobs are kept (default: finetune/ inside "
                        "--adapter-dir)")
    g.add_argument("--max-finetune-jobs", type=int, default=1, metavar="N",
                   help="fine-tuning jobs that train at once, each in its own worker process; more wait queued "
                        "(default: 1; 0 turns the fine-tuning API off)")
    g.add_argument("--finetune-threads", type=int, default=1, metavar="N",
                   help="torch threads per training worker; the serving engine keeps the other cores (default: 1)")
    g.add_argument("--max-file-bytes", type=int, default=64 << 20, metavar="BYTES",
                   help="largest training file upload (default: 67108864 = 64 MiB)")


def add_serve_ray_parser(sub) -> None:
    p = sub.add_parser("serve-ray", help="serve the same HTTP API from several engine replicas on Ray Serve",
                       description="Deploy the OpenAI-compatible server on Ray Serve: --replicas engine replicas, "
                                   "each with its own adapter slots and CPU cache, behind one endpoint; a request "
                                   "goes to a replica that already holds its adapter (Ray Serve model "
                                   "multiplexing). Joins the Ray cluster of this machine, or starts a local one. "
                                   "Needs `pip install loraserve[ray]`; every replica must see --adapter-dir.")
    p.add_argument("--replicas", type=int, default=1, help="engine replicas (default: 1)")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else the "
                   "cluster started on this machine with `ray start`, else a new local one)")
    p.add_argument("--num-cpus-per-replica", type=float, default=1.0, help="CPUs Ray reserves per replica "
                   "(default: 1)")
    p.add_argument("--num-gpus-per-replica", type=float, default=0.0, help="GPUs Ray reserves per replica "
                   "(default: 0; pass 1 on a GPU cluster)")
    p.add_argument("--max-adapters-per-replica", type=int, default=None, metavar="N",
                   help="adapters Ray Serve counts as held by one replica when routing (default: --max-loras)")
    add_server_flags(p)
    add_engine_args(p)


def add_server_flags(p: argparse.ArgumentParser) -> None:
    """The HTTP flags `serve` and `serve-ray` share."""
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; a non-loopback "
                   "address needs --api-keys or --allow-unauthenticated)")
    p.add_argument("--port", type=int, default=8000, help="port to bind (default: 8000)")
    p.add_argument("--adapter", action="append", type=parse_adapter, default=[], metavar="NAME=PATH",
                   help="register a PEFT adapter directory (or hf://org/repo) at start-up as NAME, shared with "
                        "every tenant; repeat for more")
    p.add_argument("--api-keys", metavar="FILE", default=None,
                   help="API key file made by `loraserve keys create` (keys map to tenants; hashes only). Changes "
                        "are picked up without a restart. Without it the server is open, on loopback only")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="allow binding a non-loopback --host without --api-keys (anyone who reaches it is admin)")
    p.add_argument("--max-queue", type=int, default=None, metavar="N",
                   help="requests that may wait beyond --max-num-seqs running; past that new requests get "
                        "429 with Retry-After at once (default: unbounded)")
    p.add_argument("--max-adapter-bytes", type=int, default=512 << 20, metavar="BYTES",
                   help="largest adapter upload, both PEFT files together (default: 536870912 = 512 MiB)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM, how long running requests get to finish before they are aborted (default: 30)")
    p.add_argument("--served-model-name", action="append", default=[], metavar="NAME",
                   help="another name the base model answers to in the `model` field; repeatable")
    p.add_argument("--tool-call-parser", default="auto", choices=["auto", "hermes", "llama3_json"],
                   help="the model's tool-call format, parsed into tool_calls: hermes (<tool_call> JSON blocks, "
                        "Hermes/Qwen), llama3_json (Llama 3.x JSON), auto = from the chat template (default)")
    p.add_argument("--max-schema-bytes", type=int, default=32 << 10, metavar="BYTES",
                   help="largest JSON schema a request may send, in response_format or a tool (default: 32768)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log verbosity (default: info)")


def add_keys_parser(sub) -> None:
    p = sub.add_parser("keys", help="create, list and revoke API keys",
                       description="Manage the API key file a server reads with --api-keys. Keys are stored as "
                                   "sha256 hashes; a new key is printed once. A running server picks up changes.")
    keys = p.add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="make a key for a tenant and print it (once)")
    create.add_argument("--file", required=True, help="the key file (created if missing)")
    create.add_argument("--tenant", required=True, help="the tenant the key acts for (its adapter namespace)")
    create.add_argument("--admin", action="store_true", help="an admin key: any tenant's adapters, server paths, "
                        "shared adapters, /metrics")
    listing = keys.add_parser("list", help="list key ids, tenants and roles (never the keys)")
    listing.add_argument("--file", required=True, help="the key file")
    revoke = keys.add_parser("revoke", help="revoke a key by its id (or the key itself)")
    revoke.add_argument("--file", required=True, help="the key file")
    revoke.add_argument("key", help="a key id from `keys list`, or the key")


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(host=args.host, port=args.port, api_keys=args.api_keys,
                          allow_unauthenticated=args.allow_unauthenticated, max_queue=args.max_queue,
                          max_adapter_bytes=args.max_adapter_bytes, drain_timeout=args.drain_timeout,
                          served_model_names=tuple(args.served_model_name),
                          tool_call_parser=args.tool_call_parser, max_schema_bytes=args.max_schema_bytes,
                          finetune_dir=getattr(args, "finetune_dir", None),
                          max_file_bytes=getattr(args, "max_file_bytes", 64 << 20),
                          max_finetune_jobs=getattr(args, "max_finetune_jobs", 0),    # serve-ray: off
                          finetune_threads=getattr(args, "finetune_threads", 1),
                          batch_concurrency=getattr(args, "batch_concurrency", 0))             # serve-ray: off


def run_serve(args: argparse.Namespace) -> int:
    from loraserve.async_engine import AsyncEngine

    from .server import run_server

    logging.getLogger().setLevel(args.log_level.upper())
    settings = settings_from_args(args)
    settings.check_exposure()            # before the model loads: fail fast
    engine = AsyncEngine(engine_config(args))
    try:
        store = engine.store
        store.max_adapter_bytes = settings.max_adapter_bytes
        for name, source in args.adapter:
            register_startup_adapter(store, name, source)
        return run_server(engine, settings)
    finally:
        engine.shutdown()


def run_serve_ray(args: argparse.Namespace) -> int:
    try:
        from .ray_deploy import run_serve_ray as run
    except ImportError as e:
        raise ValueError(f"serve-ray needs Ray Serve ({e}); install it with `pip install loraserve[ray]`") from None
    logging.getLogger().setLevel(args.log_level.upper())
    return run(args, engine_config(args), settings_from_args(args))


def register_startup_adapter(store, name: str, source: str) -> None:
    """Register NAME as a shared adapter of the default tenant, unless that exact file
    already is its newest version (a restart must not add a version each time)."""
    weights = os.path.join(os.path.expanduser(source), "adapter_model.safetensors")
    if os.path.isfile(weights):
        with open(weights, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        try:
            current = store.resolve(DEFAULT_TENANT, name)
            if current.sha256 == digest and current.shared and current.tenant == DEFAULT_TENANT:
                log.info("adapter %s: already registered as version %d", name, current.version)
                return
        except Exception:   # noqa: BLE001 - not registered yet, or not resolvable: register it
            pass
    record = store.register_source(DEFAULT_TENANT, name, source, shared=True)
    log.info("adapter %s: registered version %d (rank %d, %s) from %s", name, record.version, record.rank,
             ",".join(record.target_modules), source)


def run_keys(args: argparse.Namespace) -> int:
    from .keys import create_key, read_keys, revoke_key

    if args.keys_command == "create":
        key, entry = create_key(args.file, args.tenant, args.admin)
        print(key, flush=True)   # alone on stdout, so KEY=$(loraserve keys create ...) works
        print(f"{entry.id}: tenant {entry.tenant}{' (admin)' if entry.admin else ''}; the key is shown only now, "
              f"{args.file} keeps its hash", file=sys.stderr)
        return 0
    if args.keys_command == "list":
        for e in read_keys(args.file):
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.created_at))
            print(f"{e.id}\ttenant={e.tenant}\t{'admin' if e.admin else 'tenant'}\tcreated {created}")
        return 0
    for e in revoke_key(args.file, args.key):
        print(f"revoked {e.id} (tenant {e.tenant})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraserve", description="Serve one base LLM and many LoRA adapters.")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(sub)
    add_serve_parser(sub)
    add_serve_ray_parser(sub)
    add_keys_parser(sub)
    add_finetune_parser(sub)
    return parser


COMMANDS = {"generate": run_generate, "serve": run_serve, "serve-ray": run_serve_ray, "finetune": run_finetune,
            "keys": run_keys}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
