"""Which grammar engine for structured outputs: xgrammar, llguidance or outlines-core,
measured on this machine with the embedded model's tokenizer (49,152 tokens).

For each engine: the one-time tokenizer preparation (per server), the compile of a
JSON schema (per request, before its first token), and the per-token cost of computing
the next-token mask and advancing the matcher (on every decode step of a constrained
request), walking a valid answer token by token. Every engine must allow each token of
the answer; a mask that forbids one is reported, not timed.

    python -m benchmarks.grammar_engines [--repeat 3] [--write]

The engines are optional: the one the server uses is a dependency, the others are
measured when installed (`pip install llguidance outlines-core`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "role", "tags", "address", "active"],
    "additionalProperties": False,
}
ANSWER = {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "role": "admin",
          "tags": ["math", "engines", "poetry"], "address": {"city": "London", "zip": "W1"}, "active": True}


def embedded_tokenizer():
    from loraserve.model.loader import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(None).local_dir)


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size):
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self.vocab_size = vocab_size

    def compile(self, schema: str):
        return self.compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))

    def walk(self, compiled, tokens: list[int]) -> list[float]:
        matcher = self.xgr.GrammarMatcher(compiled)
        bitmask = self.xgr.allocate_token_bitmask(1, self.vocab_size)
        costs = []
        for t in tokens:
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask, 0)
            allowed = bool((bitmask[0, t // 32] >> (t % 32)) & 1)
            ok = matcher.accept_token(t)
            costs.append(time.perf_counter() - start)
            if not (allowed and ok):
                raise AssertionError(f"token {t} refused")
        return costs


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab_size):
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.ll = llguidance
        self.tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.vocab_size = vocab_size

    def compile(self, schema: str):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        matcher = self.ll.LLMatcher(self.tok, grammar)   # compiles lazily; the first mask pays
        matcher.compute_bitmask()
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return grammar

    def walk(self, grammar, tokens: list[int]) -> list[float]:
        import llguidance.torch as llt

        matcher = self.ll.LLMatcher(self.tok, grammar)
        bitmask = llt.allocate_token_bitmask(1, self.vocab_size)
        costs = []
        for t in tokens:
            start = time.perf_counter()
            llt.fill_next_token_bitmask(matcher, bitmask, 0)
            allowed = bool((bitmask[0, t // 32] >> (t % 32)) & 1)
            ok = matcher.consume_token(t)
            costs.append(time.perf_counter() - start)
            if not (allowed and ok):
                raise AssertionError(f"token {t} refused: {matcher.get_error()}")
        return costs


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tokenizer, vocab_size):
        from outlines_core import Vocabulary

        eos = tokenizer.eos_token_id
        byte_decoder = _gpt2_byte_decoder()
        vocab: dict[bytes, list[int]] = {}
        special = set(tokenizer.all_special_ids)
        for token, i in tokenizer.get_vocab().items():
            if i in special:
                continue
            vocab.setdefault(bytes(byte_decoder[c] for c in token), []).append(i)
        self.vocabulary = Vocabulary(eos, vocab)
        self.vocab_size = vocab_size

    def compile(self, schema: str):
        from outlines_core import Index
        from outlines_core.json_schema import build_regex_from_schema

        return Index(build_regex_from_schema(schema), self.vocabulary)

    def walk(self, index, tokens: list[int]) -> list[float]:
        from outlines_core import Guide

        guide = Guide(index)
        mask = torch.zeros((self.vocab_size + 31) // 32, dtype=torch.int32)
        costs = []
        for t in tokens:
            start = time.perf_counter()
            guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
            allowed = bool((mask[t // 32] >> (t % 32)) & 1)
            guide.advance(t)
            costs.append(time.perf_counter() - start)
            if not allowed:
                raise AssertionError(f"token {t} refused")
        return costs


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for bytes, reversed: 'Ġ' -> 0x20."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def measure(engine_cls, tokenizer, vocab_size, tokens, repeat: int) -> dict:
    engine, setup = timed(lambda: engine_cls(tokenizer, vocab_size))
    schema = json.dumps(SCHEMA)
    compiles, per_token = [], []
    for _ in range(repeat):
        compiled, seconds = timed(lambda: engine.compile(schema))
        compiles.append(seconds)
        per_token.extend(engine.walk(compiled, tokens))
    return {"engine": engine.name, "setup_s": setup, "compile_ms": 1e3 * statistics.median(compiles),
            "mask_us_median": 1e6 * statistics.median(per_token),
            "mask_us_p99": 1e6 * sorted(per_token)[int(0.99 * (len(per_token) - 1))]}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.grammar_engines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="compiles and walks per engine")
    parser.add_argument("--write", action="store_true", help="put the table into benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = embedded_tokenizer()
    vocab_size = len(tokenizer)
    tokens = tokenizer.encode(json.dumps(ANSWER, separators=(",", ":")), add_special_tokens=False)
    lines = ["## Grammar engines for structured outputs (benchmarks/grammar_engines.py)\n",
             f"SmolLM2 tokenizer ({vocab_size} tokens), a 7-property extraction schema, a {len(tokens)}-token "
             f"answer walked {args.repeat} times, 1 thread.\n",
             "| engine | tokenizer set-up s | schema compile ms | mask + advance us (median) | p99 us |",
             "|---|---|---|---|---|"]
    for engine_cls in (XGrammar, LLGuidance, OutlinesCore):
        try:
            row = measure(engine_cls, tokenizer, vocab_size, tokens, args.repeat)
        except ImportError as e:
            lines.append(f"| {engine_cls.name} | not installed ({e.name}) | | | |")
            continue
        except Exception as e:   # an engine that fails the answer is reported, not timed
            lines.append(f"| {engine_cls.name} | failed: {type(e).__name__}: {e} | | | |")
            continue
        lines.append(f"| {row['engine']} | {row['setup_s']:.2f} | {row['compile_ms']:.1f} | "
                     f"{row['mask_us_median']:.1f} | {row['mask_us_p99']:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        from .results_md import write_section

        write_section(os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"),
                      "grammar_engines.py", table)


if __name__ == "__main__":
    main()
