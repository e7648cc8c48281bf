"""The sampler's seam for per-request logits processing: a grammar's token mask, a
tenant's custom bias, anything that must see one request's row before a token is drawn.

A processor belongs to one request (it lives in that request's SamplingParams, so with
n > 1 every choice carries its own) and only ever sees its own row of the batch's
logits: a mixed batch of constrained and unconstrained requests, on different adapters,
is one forward pass, and the rows without a processor are not touched or copied.

The sampler calls, per step and per request that has processors:

    processor.apply(output_token_ids, row)   # row: [vocab] float32, edit in place
    ... the token is chosen from the edited row ...
    processor.accept(token_id)               # the token this request got

`accept` runs right after sampling, before the next forward pass: a processor that can
compute its next mask off the GIL (a grammar engine) starts it there, so the mask is
ready, or nearly, when the next step's logits are.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class LogitsProcessor(Protocol):
    def apply(self, output_token_ids: list[int], logits: torch.Tensor) -> None:
        """Edit this request's logits row ([vocab], float32) in place."""

    def accept(self, token_id: int) -> None:
        """The sampler chose `token_id` for this request (its next apply sees it appended)."""


def apply_logit_bias(row: torch.Tensor, bias: dict[int, float]) -> None:
    """OpenAI's logit_bias: add to the logits before temperature; -100 bans, 100 forces."""
    ids = torch.tensor(list(bias), dtype=torch.long)
    row[ids] += torch.tensor(list(bias.values()), dtype=row.dtype)
