"""What a request asks of generation, checked once when it arrives."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0            # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                      # 0 or -1 = off
    seed: int | None = None             # same seed, same output
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None         # top-N logprobs per generated token (0 = chosen only)
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None   # token id -> added to its logit (OpenAI: [-100, 100])
    # per-request LogitsProcessor objects (logits_process.py), e.g. a grammar's mask;
    # stateful ones belong to this request alone: give each request its own
    logits_processors: list = field(default_factory=list)
    # the grammar (grammar.py's text form) whose processor is among logits_processors: a
    # compiled matcher cannot cross processes, so a Ray replica compiles it again from this
    grammar: str | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if self.top_k == -1:
            self.top_k = 0
        problems = _problems(self)
        if problems:
            raise ValueError("invalid sampling parameters: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


def _problems(p: SamplingParams) -> list[str]:
    rules = [
        (isinstance(p.max_tokens, int) and p.max_tokens >= 1, f"max_tokens must be >= 1, got {p.max_tokens}"),
        (0 <= p.min_tokens <= p.max_tokens, f"min_tokens must be in [0, max_tokens], got {p.min_tokens}"),
        (p.temperature >= 0.0, f"temperature must be >= 0, got {p.temperature}"),
        (0.0 < p.top_p <= 1.0, f"top_p must be in (0, 1], got {p.top_p}"),
        (p.top_k >= 0, f"top_k must be -1, 0 (off) or positive, got {p.top_k}"),
        (p.repetition_penalty > 0.0, f"repetition_penalty must be > 0, got {p.repetition_penalty}"),
        (-2.0 <= p.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {p.presence_penalty}"),
        (-2.0 <= p.frequency_penalty <= 2.0, f"frequency_penalty must be in [-2, 2], got {p.frequency_penalty}"),
        (p.logprobs is None or 0 <= p.logprobs <= 20, f"logprobs must be in [0, 20], got {p.logprobs}"),
        (all(isinstance(s, str) and s for s in p.stop), "stop strings must be non-empty strings"),
        (all(isinstance(t, int) and t >= 0 for t in p.stop_token_ids), "stop_token_ids must be non-negative integers"),
        (all(isinstance(t, int) and t >= 0 and -100 <= v <= 100 for t, v in (p.logit_bias or {}).items()),
         "logit_bias maps token ids (>= 0) to values in [-100, 100]"),
    ]
    return [message for ok, message in rules if not ok]
