"""Constrained decoding with llguidance: a grammar (a JSON schema, or Lark with embedded
JSON schemas for tool calls) becomes a per-request LogitsProcessor that masks every token
the grammar cannot take next.

Why llguidance (benchmarks/grammar_engines.py, figures in benchmarks/RESULTS.md): it
refuses the JSON-schema keywords it cannot enforce, by name, where xgrammar silently
ignores some (`not`), and an answer that does not fit the schema is the one failure a
caller of `strict` cannot accept; it compiles lazily (a schema costs about 1 ms before
the first token), computes a mask in tens of microseconds off the GIL, bounds the work
of a hostile grammar (LLParserLimits), and has no dependencies.

The mask for step t+1 needs the token of step t, and the forward pass of step t+1 does
not: `accept` hands the next mask to a worker thread, and `apply` waits for it. Requests
without a grammar never reach this module.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import torch

log = logging.getLogger(__name__)

# JSON as json.dumps writes it (", " and ": "), no other whitespace: small models given
# free whitespace can pad an answer with newlines until max_tokens.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A grammar or schema that cannot be enforced; the message names the problem."""


class GrammarCompiler:
    """One per served tokenizer. The tokenizer's llguidance form is built on first use
    (about 2 s for a 49k vocabulary), so a server that never constrains never pays it."""

    def __init__(self, tokenizer, vocab_size: int, mask_threads: int = 2):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size          # the logits' width, which may exceed the tokenizer's
        self._ll_tokenizer = None
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(mask_threads, thread_name_prefix="loraserve-mask")

    @property
    def ll_tokenizer(self):
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance.hf

                self._ll_tokenizer = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size)
            return self._ll_tokenizer

    @staticmethod
    def json_schema(schema: dict | bool) -> str:
        """The grammar of JSON text that fits `schema`."""
        import llguidance

        try:
            return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
        except Exception as e:   # noqa: BLE001 - whatever the schema's fault, it is the caller's 400
            raise GrammarError(f"the JSON schema is not valid: {e}") from None

    @staticmethod
    def lark(text: str) -> str:
        import llguidance

        return llguidance.LLMatcher.grammar_from_lark(text)

    def processor(self, grammar: str) -> "GrammarProcessor":
        """A fresh matcher for one request; GrammarError when the grammar cannot be enforced.
        Compiling drops the GIL: call it off the event loop, never on the engine thread."""
        import llguidance

        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0, limits=llguidance.LLParserLimits())
        if matcher.is_error():
            raise GrammarError(_short_error(matcher.get_error()))
        return GrammarProcessor(matcher, self.vocab_size, self._executor, self.tokenizer.eos_token_id)

    def check(self, grammar: str) -> None:
        """Raise GrammarError unless `grammar` can be enforced (compiling it once)."""
        self.processor(grammar)


class GrammarProcessor:
    """The LogitsProcessor of one constrained request: its row keeps only the tokens the
    grammar allows. It never raises into the batch: a matcher in an error state (a token
    it did not allow was forced in) leaves only end-of-sequence, which ends the request."""

    def __init__(self, matcher, vocab_size: int, executor: ThreadPoolExecutor, eos_token_id: int | None):
        import llguidance.torch as llt

        self.matcher = matcher
        self.bitmask = llt.allocate_token_bitmask(1, vocab_size)   # [1, ceil(vocab / 32)] int32
        self.vocab_size = vocab_size
        self.banned: torch.Tensor | None = None                     # [vocab] bool, from the bitmask
        self.eos_token_id = eos_token_id
        self._executor = executor
        self._pending: Future = executor.submit(self._fill)

    def _fill(self) -> None:
        import llguidance.torch as llt

        llt.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        self.banned = unpack_banned(self.bitmask[0], self.vocab_size)   # here too, off the engine thread

    def apply(self, output_token_ids: list[int], logits: torch.Tensor) -> None:
        try:
            self._pending.result()
        except Exception:   # noqa: BLE001 - this request ends (below); the others are unaffected
            log.exception("computing a grammar mask failed")
            self.banned = None
        if self.banned is None or self.matcher.is_error() or self.matcher.is_stopped():
            self._only_eos(logits)
            return
        logits[: self.vocab_size].masked_fill_(self.banned, float("-inf"))
        logits[self.vocab_size:] = float("-inf")

    def accept(self, token_id: int) -> None:
        self.banned = None
        if not self.matcher.is_stopped() and not self.matcher.consume_token(token_id):
            log.warning("grammar refused token %d: %s", token_id, _short_error(self.matcher.get_error()))
        if not self.matcher.is_error() and not self.matcher.is_stopped():
            self._pending = self._executor.submit(self._fill)   # overlaps the next forward pass

    def _only_eos(self, logits: torch.Tensor) -> None:
        keep = logits[self.eos_token_id].clone() if self.eos_token_id is not None else None
        logits.fill_(float("-inf"))
        if keep is not None:
            logits[self.eos_token_id] = keep if torch.isfinite(keep) else 0.0

    @property
    def is_accepting(self) -> bool:
        return self.matcher.is_accepting()


_BITS = torch.arange(32, dtype=torch.int32)


def unpack_banned(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """banned[t] = bit t of the packed mask is 0. (llguidance.torch applies a bitmask too,
    but under torch.compile: seconds on its first call on CPU, and again per new shape.)"""
    return ((bitmask.unsqueeze(-1) >> _BITS) & 1).flatten()[:vocab_size] == 0   # [ceil(V/32), 32] -> [V]


def _short_error(message: str) -> str:
    message = " ".join(message.split())
    return message if len(message) <= 400 else message[:397] + "..."
