"""A request's prompt and adapter after every check, made once by `LLMEngine.prepare`.

The HTTP layer, the offline `LLM` and a Ray ingress all prepare a request before they
hand it to the engine, and `add_request` trusts what it gets: the prompt ids are in the
model's vocabulary and leave room to generate, and the adapter is a resolved version
(its record), so nothing is looked up or checked a second time on the engine's thread.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraserve.adapters import DEFAULT_TENANT, AdapterRecord, AdapterStore


class PromptError(ValueError):
    """A prompt the engine cannot run; `param` names the request field at fault."""

    def __init__(self, message: str, param: str = "prompt", code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


class ContextLengthExceeded(PromptError):
    def __init__(self, prompt_len: int, max_model_len: int):
        super().__init__(f"the prompt is {prompt_len} tokens but this model's maximum context length is "
                         f"{max_model_len} tokens, and it needs room for one generated token; shorten the prompt",
                         code="context_length_exceeded")
        self.prompt_len = prompt_len
        self.max_model_len = max_model_len


@dataclass(frozen=True)
class PreparedPrompt:
    prompt_ids: list[int]
    adapter: AdapterRecord | None    # the version the request runs on; None = the base model
    adapter_ref: str | None = None   # the reference as the caller wrote it (RequestOutput.adapter)

    @property
    def adapter_key(self) -> str | None:
        return None if self.adapter is None else self.adapter.key


def check_prompt_ids(ids: list[int], vocab_bound: int, max_model_len: int) -> list[int]:
    """The one check of a prompt's ids: not empty, every id a token the tokenizer and the
    embedding both know, and shorter than the context (one token must still fit)."""
    if not ids:
        raise PromptError("the prompt is empty; send at least one token")
    if not all(isinstance(t, int) and 0 <= t < vocab_bound for t in ids):
        raise PromptError(f"prompt token ids must be integers in [0, {vocab_bound})")
    if len(ids) >= max_model_len:
        raise ContextLengthExceeded(len(ids), max_model_len)
    return list(ids)


def prepare_prompt(prompt: str | list[int], adapter: str | AdapterRecord | None, tenant: str = DEFAULT_TENANT, *,
                   tokenizer, store: AdapterStore, vocab_bound: int, max_model_len: int) -> PreparedPrompt:
    """What LLMEngine.prepare does, over the facts it reads (a Ray ingress has the same
    facts without an engine). A text prompt is encoded as is; a record is taken as
    resolved; a reference is resolved in the tenant's view of the store."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    ids = check_prompt_ids(ids, vocab_bound, max_model_len)
    if adapter is None or isinstance(adapter, AdapterRecord):
        return PreparedPrompt(ids, adapter, None if adapter is None else f"{adapter.name}@{adapter.version}")
    return PreparedPrompt(ids, store.resolve(tenant, adapter), adapter)
