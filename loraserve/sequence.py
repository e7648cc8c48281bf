"""A request as the scheduler sees it: token ids, progress, and the blocks it holds."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int
    prompt_token_ids: list[int]
    params: Any                        # SamplingParams; opaque to the scheduler
    adapter_key: str | None = None     # identity of the adapter's weights; None = base model
    arrival: float = 0.0
    priority: int = 0                  # lower runs first; Batch API lines run at BATCH_PRIORITY
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0       # tokens whose K/V sit in this sequence's blocks
    num_cached_tokens: int = 0         # of those, how many came from the prefix cache
    block_table: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    slot_wait_steps: int = 0           # steps spent waiting for a free adapter slot
    finish_reason: str | None = None
    state: Any = None                  # engine-side per-request state (detokenizer, rng)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def needs_token_after(self, num_new_tokens: int) -> bool:
        """Computing `num_new_tokens` more completes the context: a token is sampled. The
        one definition the scheduler (advance) and the runner (which rows get logits) share."""
        return self.num_computed_tokens + num_new_tokens == self.num_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
