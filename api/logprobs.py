"""The engine's TokenLogprob list in OpenAI's two shapes: the legacy completions object
(tokens / token_logprobs / top_logprobs / text_offset) and chat's `content` list."""

from __future__ import annotations

from loraserve.outputs import TokenLogprob

FLOOR = -9999.0   # JSON has no -inf: a banned token's logprob is reported as this


def _lp(value: float) -> float:
    return value if value > FLOOR else FLOOR


def completion_logprobs(lps: list[TokenLogprob], token_text, start_offset: int = 0) -> dict:
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = start_offset
    for lp in lps:
        text = token_text(lp.token_id)
        tokens.append(text)
        token_logprobs.append(_lp(lp.logprob))
        top = {token_text(t): _lp(v) for t, v in (lp.top or [])}
        top.setdefault(text, _lp(lp.logprob))
        top_logprobs.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_logprobs(lps: list[TokenLogprob], token_text, num_top: int) -> dict:
    def entry(token_id: int, value: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": _lp(value), "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob),
                         "top_logprobs": [entry(t, v) for t, v in (lp.top or [])[:num_top]]} for lp in lps],
            "refusal": None}
