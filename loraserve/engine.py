"""The engine loop: schedule, make adapters resident, run, sample, update.

Synchronous and single-threaded; AsyncEngine runs it on its own thread.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import torch

from loraserve.adapters import (DEFAULT_TENANT, AdapterNotFound, AdapterRecord, AdapterRegistry, AdapterStore,
                                BaseModelSpec, default_store_root)

from .block_manager import BlockManager
from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .engine_stats import EngineStats
from .hooks import EngineHooks
from .model.loader import load_config, load_tokenizer, resolve_model
from .model.runner import ModelRunner, StepInput, check_supported, resolve_device, resolve_dtype
from .outputs import RequestOutput, TokenLogprob
from .prepared import PreparedPrompt, prepare_prompt
from .sampler import Sample, SampleRequest, Sampler
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_TENANT", "LLMEngine", "PreparedPrompt", "StepResult"]


@dataclass
class StepResult:
    """What one engine step did."""
    outputs: list[RequestOutput]    # every request that moved: a token, a finish, an error
    num_scheduled_tokens: int = 0   # tokens computed (prefill chunks and decodes)
    num_preempted: int = 0          # requests sent back to wait, their KV dropped
    slots_written: list[int] = field(default_factory=list)   # adapter slots loaded onto the device


@dataclass
class RequestState:
    """Engine-side state of one request, beside the scheduler's Sequence."""
    output: RequestOutput
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None


class LLMEngine:
    def __init__(self, config: EngineConfig, hooks: EngineHooks | None = None):
        self.config = config
        self.hooks = hooks = hooks or EngineHooks()     # seams for tests and tools (hooks.py)
        source = resolve_model(config.model, config.cache_dir)
        self.model_id = source.model_id
        self.model_dir = source.local_dir       # the HF directory loaded (a fine-tuning worker loads it again)
        self.hf_config = load_config(source.local_dir)
        check_supported(self.hf_config)
        self.tokenizer = load_tokenizer(source.local_dir)
        context = getattr(self.hf_config, "max_position_embeddings", 4096)   # windowed layers window attention
        wanted = config.max_model_len or min(context, 4096)
        if wanted > context:
            raise ValueError(f"max_model_len {wanted} exceeds the model's context of {context} tokens")
        self.spec = BaseModelSpec.from_hf_config(self.hf_config, config.max_lora_rank, self.model_id,
                                                 config.max_module_copy_bytes)
        self.store = AdapterStore(config.adapter_dir or default_store_root(), self.spec)
        device = resolve_device(config.device)
        self.adapters = AdapterRegistry(self.store, config.max_loras, config.max_cpu_loras,
                                        resolve_dtype(config.dtype, device), device, hooks.adapter_load,
                                        int8_slots=config.lora_dtype == "int8")
        self.slots = self.adapters.slots
        self.runner = ModelRunner(config, self.hf_config, source, wanted, self.slots, hooks)
        # one request must always fit the KV pool, or preemption could never make room
        self.max_model_len = min(wanted, self.runner.num_blocks * config.block_size)
        self.blocks = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, self.slots, config.max_num_seqs, config.max_num_batched_tokens,
                                   max_background_tokens=config.max_background_tokens,
                                   background_hold_steps=config.background_hold_steps)
        self.sampler = Sampler(config.seed)
        self.requests: dict[str, Sequence] = {}
        self.eos_token_ids = _eos_ids(self.tokenizer, self.hf_config)
        # a prompt id must be a token the tokenizer decodes and the embedding holds
        self.vocab_bound = min(len(self.tokenizer), self.hf_config.vocab_size)
        self._ids = itertools.count()
        log.info("model %s: %d KV blocks of %d tokens, %d adapter slots of rank %d (%.1f MB), %s on %s",
                 self.model_id, self.runner.num_blocks, config.block_size, config.max_loras,
                 config.max_lora_rank, self.slots.device_bytes / 2**20, self.runner.dtype, self.runner.device)

    # -- adapters ------------------------------------------------------------------------
    def add_adapter(self, name: str, path: str, tenant: str = DEFAULT_TENANT) -> AdapterRecord:
        """Register a PEFT directory in the store as the next version of `name`. Running
        requests finish on the version they started with; new ones get this one, and no
        prefix-cache block computed with other weights is reused (the key has the version)."""
        return self.store.register_dir(tenant, name, path)

    def remove_adapter(self, name: str, tenant: str = DEFAULT_TENANT) -> list[AdapterRecord]:
        """Delete every version of `name` (or one: `name@2`). Requests already accepted
        with a deleted version still finish on it; new ones cannot resolve it."""
        doomed = [r for r in self._versions(tenant, name) if self._in_use(r.key)]
        for record in doomed:
            self.adapters.retain(record)
        removed = self.store.delete(tenant, name)
        for record in removed:
            if not self._in_use(record.key):
                self.forget_adapter(record)
        return removed

    def _versions(self, tenant: str, ref: str) -> list[AdapterRecord]:
        name, _, version = ref.partition("@")
        records = self.store.versions(tenant, name)
        return [r for r in records if not version or str(r.version) == version]

    def _in_use(self, key: str) -> bool:
        return any(s.adapter_key == key for s in self.requests.values())

    def forget_adapter(self, record: AdapterRecord) -> None:
        """Drop cached copies of a deleted version (once no request uses it)."""
        self.adapters.forget(record.key)

    def adapter_tier(self, record: AdapterRecord) -> str:
        return self.adapters.tier(record)

    def adopt_adapter(self, record: AdapterRecord, blob_id: str) -> None:
        """A version registered in another process's store (a Ray ingress's): index it
        here, and start reading it into the CPU tier (never blocks)."""
        self.store.adopt(record, blob_id)
        self.adapters.admit(record)
        self.adapters.cpu.get(record)

    def drop_adapter(self, record: AdapterRecord) -> None:
        """A version deleted from another process's store: what remove_adapter does once
        the files are gone. Requests running on it keep what is cached of it and finish."""
        self.store.unindex(record)
        if not self._in_use(record.key):
            self.forget_adapter(record)
            return
        try:
            self.adapters.retain(record)
        except AdapterNotFound:   # not cached and its files are gone: its requests fail when they load
            pass

    # -- requests ------------------------------------------------------------------------
    def prepare(self, prompt: str | list[int], adapter: str | AdapterRecord | None = None,
                tenant: str = DEFAULT_TENANT) -> PreparedPrompt:
        """Every check of a request's prompt and adapter, done once (prepared.py): ids,
        context length, and the adapter reference (`name`, `name@3`, `owner/name` in the
        tenant's view) resolved to its version. Safe from any thread: it reads fixed
        facts and the store, which has its own lock."""
        return prepare_prompt(prompt, adapter, tenant, tokenizer=self.tokenizer, store=self.store,
                              vocab_bound=self.vocab_bound, max_model_len=self.max_model_len)

    def add_request(self, prompt: PreparedPrompt | str | list[int], params: SamplingParams,
                    adapter: str | None = None, request_id: str | None = None, tenant: str = DEFAULT_TENANT,
                    priority: int = 0) -> str:
        """`prompt` is prepared (see `prepare`), or a prompt that is prepared here with
        `adapter` and `tenant`; `priority` orders it in the scheduler (lower first; see
        scheduler.py). A bad request raises and leaves no trace."""
        if not isinstance(params, SamplingParams):
            raise TypeError("params must be a SamplingParams")
        prepared = prompt if isinstance(prompt, PreparedPrompt) else self.prepare(prompt, adapter, tenant)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if prepared.adapter is not None:
            self.adapters.admit(prepared.adapter)
        ids = prepared.prompt_ids
        seq = Sequence(next(self._ids), ids, params, prepared.adapter_key, arrival=time.monotonic(),
                       priority=priority)
        seq.state = RequestState(
            output=RequestOutput(request_id, ids, prepared.adapter_ref,
                                 adapter_tier=None if prepared.adapter is None else self.adapters.tier(prepared.adapter)),
            detokenizer=IncrementalDetokenizer(self.tokenizer, ids, params.stop,
                                               params.include_stop_str_in_output, params.skip_special_tokens),
            generator=None if params.seed is None else torch.Generator().manual_seed(params.seed),
        )
        if params.logprobs is not None:
            seq.state.output.logprobs = []
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self.requests.get(request_id)
        if seq is None:
            return None
        self._end(seq, "abort")
        out = seq.state.output
        out.finish_reason = "abort"
        return out

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # -- the step ------------------------------------------------------------------------
    def step(self) -> StepResult:
        """One engine step: schedule, make the batch's adapters resident, run, sample,
        update. A failure fails only the requests it touched: an exception in the forward
        pass fails that step's batch, one in a request's post-processing fails that
        request; everything else keeps running."""
        failed = self._fail_unloadable()
        batch = self.scheduler.schedule()
        written = self.adapters.make_resident()
        if not batch.items:
            if self.scheduler.waiting:
                self.adapters.cpu.wait(0.05)    # adapters still loading: sleep, do not spin
            return StepResult(failed, slots_written=written)
        try:
            seqs, logits = self.runner.run([StepInput(seq, n, self.slots.slot(seq.adapter_key))
                                            for seq, n in batch.items])
            self.scheduler.advance(batch)
            samples = self.sampler(logits, [self._sample_request(s) for s in seqs]) if seqs else []
        except Exception as e:
            log.exception("engine step failed; failing its %d requests", len(batch.items))
            outputs = failed + [self._fail(seq, f"internal error: {e}") for seq, _ in batch.items]
        else:
            outputs = failed + [self._append_or_fail(seq, sample) for seq, sample in zip(seqs, samples)]
        return StepResult(outputs, batch.num_tokens, batch.num_preempted, written)

    def _append_or_fail(self, seq: Sequence, sample: Sample) -> RequestOutput:
        try:
            return self._append(seq, sample)
        except Exception as e:
            log.exception("post-processing request %s failed", seq.state.output.request_id)
            return self._fail(seq, f"internal error: {e}")

    def _fail(self, seq: Sequence, message: str) -> RequestOutput:
        out = seq.state.output
        out.finish_reason, out.error = "error", message
        self._end(seq, "error")
        return out

    def _fail_unloadable(self) -> list[RequestOutput]:
        """Requests whose adapter could not be read (deleted, corrupted) end with an error."""
        failures = self.adapters.cpu.take_failures()
        if not failures:
            return []
        return [self._fail(seq, failures[seq.adapter_key])
                for seq in [s for s in self.scheduler.waiting if s.adapter_key in failures]]

    def _end(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        self.requests.pop(seq.state.output.request_id, None)
        key = seq.adapter_key
        if key is not None and self.adapters.is_retained(key) and not self._in_use(key):
            self.adapters.forget(key)             # the last request on a deleted version ended

    def _sample_request(self, seq: Sequence) -> SampleRequest:
        p = seq.params
        banned = []
        if len(seq.output_token_ids) < p.min_tokens:
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_token_ids))
        return SampleRequest(p, seq.prompt_token_ids, seq.output_token_ids, seq.state.generator, banned)

    def _append(self, seq: Sequence, sample: Sample) -> RequestOutput:
        state = seq.state
        out = state.output
        if self.hooks.on_token is not None:
            self.hooks.on_token(seq, sample.token_id)
        seq.output_token_ids.append(sample.token_id)
        out.token_ids = seq.output_token_ids
        out.delta_token_ids = [sample.token_id]
        out.num_cached_tokens = max(out.num_cached_tokens, seq.num_cached_tokens)
        if out.logprobs is not None:
            out.logprobs.append(TokenLogprob(sample.token_id, sample.logprob, sample.top_logprobs))
        matched = state.detokenizer.append(sample.token_id)
        reason = self._finish_reason(seq, sample.token_id, matched)
        if reason is not None:
            out.finish_reason = reason
            out.stop_reason = matched if matched is not None else (
                sample.token_id if reason == "stop" else None)
            self._end(seq, reason)
        out.text = state.detokenizer.text
        out.delta_text = state.detokenizer.delta(out.finished)
        return out

    def _finish_reason(self, seq: Sequence, token: int, matched_stop: str | None) -> str | None:
        p = seq.params
        n = len(seq.output_token_ids)
        if matched_stop is not None and n >= p.min_tokens:
            return "stop"
        if n >= p.min_tokens and (token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids)):
            return "stop"
        if n >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    # -- introspection -------------------------------------------------------------------
    def stats(self) -> EngineStats:
        cpu = self.adapters.cpu
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_preemptions=self.scheduler.num_preemptions,
            kv_blocks_total=self.blocks.num_blocks,
            kv_blocks_used=self.blocks.num_used_blocks,
            prefix_cache_queries=self.blocks.num_cache_queries,
            prefix_cache_hits=self.blocks.num_cache_hits,
            adapter_slots_total=self.slots.max_loras,
            adapter_slots_used=self.slots.num_used,
            adapter_slots_pinned=len(self.slots.pins),
            adapter_loads=self.slots.num_loads,
            adapter_evictions=self.slots.num_evictions,
            device_hits=self.slots.num_hits,
            cpu_hits=cpu.num_hits,
            disk_loads=cpu.num_loads,
            disk_load_seconds=cpu.load_seconds_total,
            base_weight_bytes=self.runner.base_weight_bytes,
            adapter_slot_bytes=self.slots.device_bytes,
            resident=self.adapters.resident(),
        )


def _eos_ids(tokenizer, hf_config) -> set[int]:
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(hf_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(value)
    return ids
