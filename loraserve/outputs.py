"""What a caller gets back for a request: the whole result so far plus the last delta."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] | None = None    # (token_id, logprob), best first


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    adapter: str | None
    text: str = ""
    token_ids: list[int] = field(default_factory=list)      # generated ids
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None                        # stop | length | abort | error
    stop_reason: str | int | None = None                    # the stop string or token that matched
    error: str | None = None
    num_cached_tokens: int = 0
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    adapter_tier: str | None = None                         # where the adapter was when the request came: device, cpu, disk
    replica: str | None = None                              # the Ray Serve replica that served it, if any

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
