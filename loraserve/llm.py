"""Offline batch API: many prompts, each with its own adapter, in one call."""

from __future__ import annotations

import shutil
import tempfile
import weakref
from dataclasses import fields
from typing import Sequence as Seq

from tqdm.auto import tqdm

from .chat_template import chat_prompt_ids
from .config import EngineConfig
from .engine import LLMEngine
from .outputs import RequestOutput
from .sampling_params import SamplingParams


class LLM:
    """`LLM()` serves the embedded SmolLM2 with no network; keyword arguments are
    EngineConfig fields (model, dtype, max_loras, max_lora_rank, ...). Without an
    `adapter_dir`, adapters live in a temporary store that goes with this object:
    offline scripts should not pile versions into the user's durable store."""

    def __init__(self, model: str | None = None, **kwargs):
        known = {f.name for f in fields(EngineConfig)}
        unknown = set(kwargs) - known
        if unknown:
            raise TypeError(f"unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
        if kwargs.get("adapter_dir") is None:
            kwargs["adapter_dir"] = tempfile.mkdtemp(prefix="loraserve-adapters-")
            weakref.finalize(self, shutil.rmtree, kwargs["adapter_dir"], True)
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self.tokenizer = self.engine.tokenizer

    def add_adapter(self, name: str, path: str):
        """Register a PEFT directory as the next version of `name`; returns its record."""
        return self.engine.add_adapter(name, path)

    def remove_adapter(self, name: str):
        """Delete every version of `name`; requests already running on it finish."""
        return self.engine.remove_adapter(name)

    def generate(self, prompts: str | list[str] | list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 adapters: str | None | Seq[str | None] = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Outputs come back in input order. Every request is checked before any runs, so
        a bad one raises without side effects."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        n = len(prompts)
        params_list = _broadcast(params or SamplingParams(), n, "params")
        adapter_list = _broadcast(adapters, n, "adapters")
        for sp in params_list:
            if not isinstance(sp, SamplingParams):
                raise TypeError("params must be a SamplingParams")
        prepared = [self.engine.prepare(p, a) for p, a in zip(prompts, adapter_list)]
        ids = [self.engine.add_request(p, sp) for p, sp in zip(prepared, params_list)]
        return self._run(ids, use_tqdm)

    def chat(self, conversations: list[dict] | list[list[dict]], params: SamplingParams | list[SamplingParams] | None = None,
             adapters: str | None | Seq[str | None] = None, use_tqdm: bool = True) -> list[RequestOutput]:
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [self.apply_chat_template(c) for c in conversations]
        return self.generate(prompts, params, adapters, use_tqdm)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm)
        try:
            while len(results) < len(ids):
                for out in self.engine.step().outputs:
                    if out.finished and out.request_id not in results:
                        results[out.request_id] = out
                        bar.update(1)
        except BaseException:
            for rid in ids:
                self.engine.abort(rid)
            raise
        finally:
            bar.close()
        return [results[rid] for rid in ids]


def _broadcast(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} prompts")
        return list(value)
    return [value] * n
