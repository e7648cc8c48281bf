"""An OpenAI request's sampling fields -> the engine's SamplingParams, one per choice.

OpenAI's defaults where they differ from the engine's: temperature 1, top_p 1. With a
seed and n > 1, choice i uses seed + i, so the choices differ and each is reproducible.
"""

from __future__ import annotations

from loraserve.prepared import ContextLengthExceeded, PreparedPrompt, PromptError
from loraserve.sampling_params import SamplingParams

from .errors import APIError
from .model_names import Target
from .openai_models import _Sampling

MAX_STOP = 4


def refuse_unsupported(req: _Sampling) -> None:
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", "stream_options")
    if isinstance(req.stop, list) and len(req.stop) > MAX_STOP:
        raise APIError(400, f"stop takes at most {MAX_STOP} sequences, got {len(req.stop)}", "stop")
    if isinstance(req.stop, str) and not req.stop:
        raise APIError(400, "stop must not be an empty string", "stop")


def prepare(engine, ids: list[int], target: Target, what: str = "prompt") -> PreparedPrompt:
    """The engine's one check of a prompt (LLMEngine.prepare), its errors in OpenAI's words;
    `what` is the request field the prompt came from (prompt, or messages)."""
    try:
        return engine.prepare(ids, target.record)
    except ContextLengthExceeded as e:
        raise APIError(400, f"This model's maximum context length is {e.max_model_len} tokens, but the {what} "
                            f"{'are' if what == 'messages' else 'is'} {e.prompt_len} tokens; shorten the {what}.",
                       what, "context_length_exceeded") from None
    except PromptError as e:
        raise APIError(400, str(e), what, e.code) from None


def check_length(prompt_len: int, max_tokens: int | None, max_model_len: int, what: str = "messages") -> int:
    """The max_tokens to use (the room the context leaves, when not given); 400 when the
    prompt (checked already by `prepare`) plus max_tokens does not fit."""
    if max_tokens is None:
        return max_model_len - prompt_len
    if prompt_len + max_tokens > max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                            f"{prompt_len + max_tokens} tokens ({prompt_len} in the {what}, {max_tokens} in the "
                            f"completion). Please reduce the length of the {what} or completion (max_tokens).",
                       "max_tokens", "context_length_exceeded")
    return max_tokens


def logit_bias(bias: dict[str, float] | None, vocab_size: int | None) -> dict[int, float] | None:
    """OpenAI's logit_bias: token ids (as JSON object keys) -> a bias in [-100, 100]."""
    if not bias:
        return None
    out = {}
    for key, value in bias.items():
        if not (key.isdigit() and (vocab_size is None or int(key) < vocab_size)):
            raise APIError(400, f"logit_bias key {key!r} is not a token id in [0, {vocab_size or 'vocab'})",
                           "logit_bias")
        if not -100 <= value <= 100:
            raise APIError(400, f"logit_bias[{key!r}] is {value}; values must be in [-100, 100]", "logit_bias")
        out[int(key)] = float(value)
    return out


def sampling_params(req: _Sampling, max_tokens: int, logprobs: int | None,
                    vocab_size: int | None = None) -> list[SamplingParams]:
    """One SamplingParams per choice; a bad combination is a 400 naming it."""
    bias = logit_bias(req.logit_bias, vocab_size)
    base = dict(
        max_tokens=max_tokens,
        min_tokens=req.min_tokens or 0,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        stop=req.stop,
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos,
        include_stop_str_in_output=req.include_stop_str_in_output,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens,
    )
    if bias:
        base["logit_bias"] = bias
    out = []
    for i in range(req.n):
        seed = None if req.seed is None else (req.seed + i if req.seed + i < 2**63 else req.seed - i)
        try:
            out.append(SamplingParams(seed=seed, **base))
        except ValueError as e:
            raise APIError(400, str(e)) from None
    return out
