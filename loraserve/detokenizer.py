"""Token ids to text, a few tokens at a time, as they are generated.

Decoding one token alone is wrong for byte-level BPE (a multi-byte UTF-8 character can
span tokens) and for SentencePiece (spaces depend on the neighbour). So each step
decodes a short window that starts a few tokens back and emits only what is new once
it no longer ends in an incomplete character. Stop strings are matched on the text,
and text that could still become the start of a stop string is held back.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str],
                 include_stop: bool = False, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.ids = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
        self.include_stop = include_stop
        self.skip_special = skip_special_tokens
        self.text = ""            # all generated text so far (cut at a stop string)
        self.emitted = 0          # characters of self.text already handed out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def append(self, token_id: int) -> str | None:
        """Add a token; returns the stop string that matched, if any."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            new = full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
            self.text += new
            return self._check_stop(start)
        return None

    def _check_stop(self, search_from: int) -> str | None:
        for s in self.stop:
            at = self.text.find(s, search_from)
            if at >= 0:
                self.text = self.text[: at + len(s) if self.include_stop else at]
                return s
        return None

    def delta(self, finished: bool) -> str:
        """New text to stream. While running, hold back a tail that may begin a stop string."""
        end = len(self.text)
        if not finished and self.stop:
            end = max(self.emitted, end - _partial_stop_len(self.text, self.stop))
        out = self.text[self.emitted : end]
        self.emitted = end
        return out


def _partial_stop_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
