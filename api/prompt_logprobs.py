"""Prompt logprobs for `echo` with `logprobs` on /v1/completions (what evaluation harnesses
send to score a text), computed by teacher forcing through the logits seam: an engine
request starts from the prompt's first token and is forced, token by token, to write
the rest of the prompt. The sampler reports logprobs from the model's own logits (before
any processor), so each forced token's logprob is exactly log p(prompt[i] | prompt[:i])
under the request's adapter, with the top-N alternatives.

It costs one decode step per prompt token (batched with everything else), not one
prefill: right for the short texts scoring sends; a prefill-time path needs the runner
to return the logits of every prompt position.
"""

from __future__ import annotations

import asyncio
import dataclasses

import torch

from loraserve.outputs import TokenLogprob
from loraserve.prepared import PreparedPrompt
from loraserve.sampling_params import SamplingParams

from .errors import APIError
from .logprobs import completion_logprobs


class ForceTokens:
    """The LogitsProcessor of teacher forcing: the k-th generated token is tokens[k]."""

    def __init__(self, tokens: list[int]):
        self.tokens = tokens

    def apply(self, output_token_ids: list[int], logits: torch.Tensor) -> None:
        token = self.tokens[min(len(output_token_ids), len(self.tokens) - 1)]
        logits.fill_(float("-inf"))
        logits[token] = 0.0

    def accept(self, token_id: int) -> None:
        pass


async def score_prompts(engine, prompts: list[PreparedPrompt], top: int, request_id: str) -> list[list]:
    """For each prompt, [None, TokenLogprob of prompt[1], ...], scored concurrently."""
    return await asyncio.gather(*(_score(engine, p, top, f"{request_id}-prompt{i}") for i, p in enumerate(prompts)))


async def _score(engine, prompt: PreparedPrompt, top: int, request_id: str) -> list[TokenLogprob | None]:
    ids = prompt.prompt_ids
    if len(ids) < 2:
        return [None]
    params = SamplingParams(max_tokens=len(ids) - 1, temperature=0, ignore_eos=True, logprobs=top,
                            logits_processors=[ForceTokens(ids[1:])])
    last = None
    async for out in engine.generate(dataclasses.replace(prompt, prompt_ids=ids[:1]), params, request_id=request_id):
        last = out
    if last is None or last.finish_reason in ("abort", "error") or len(last.logprobs) != len(ids) - 1:
        raise APIError(500, f"scoring the prompt failed ({last.error if last else 'no output'}); other requests "
                            "are unaffected, retry it", code="engine_error")
    return [None, *last.logprobs]


def echo_logprobs(prompt_ids: list[int], scored: list[TokenLogprob | None], token_text) -> dict:
    """The prompt's part of a legacy logprobs object: the first token has none (null), as OpenAI's."""
    rest = completion_logprobs([lp for lp in scored if lp is not None], token_text, len(token_text(prompt_ids[0])))
    first = token_text(prompt_ids[0])
    return {"tokens": [first, *rest["tokens"]], "token_logprobs": [None, *rest["token_logprobs"]],
            "top_logprobs": [None, *rest["top_logprobs"]], "text_offset": [0, *rest["text_offset"]]}


def joined(echo: dict, generated: dict | None, echo_text_len: int) -> dict:
    """echo's lists followed by the generated ones, whose offsets start after the echoed text."""
    if generated is None:
        return echo
    offsets = [o + echo_text_len for o in generated["text_offset"]]
    return {k: echo[k] + (offsets if k == "text_offset" else generated[k]) for k in echo}

