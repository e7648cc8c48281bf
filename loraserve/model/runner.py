"""Turns a scheduled batch into tensors, runs the model, and returns the logits of the
sequences that need a token. Owns the weights and the KV cache; the LoRA slot buffers
belong to the adapters' slot pool, which the model reads through views of its layers."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from loraserve.adapters import SlotPool
from loraserve.config import EngineConfig
from loraserve.hooks import EngineHooks
from loraserve.kernels import select_kernels
from loraserve.sequence import Sequence

from . import adapter_extras
from .base_weights import pack_base_weights, pack_output_head
from .quantize import resolve_quantization, served_blocks
from .cuda_graphs import DecodeGraphs, DecodeInputs
from .layers import ForwardBatch
from .loader import ModelSource, load_state_dict
from .registry import model_class

log = logging.getLogger(__name__)


@dataclass
class StepInput:
    seq: Sequence
    num_tokens: int       # tokens computed this step
    slot: int             # adapter slot, -1 = base model


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16
    return getattr(torch, name)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_supported(hf_config) -> None:
    model_class(hf_config)
    qc = getattr(hf_config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if method not in (None, "gguf"):      # a GGUF conversion's config names its file, its weights are plain
        raise ValueError(
            f"the model is a pre-quantized {method!r} checkpoint, which loraserve does not load: serve its "
            f"unquantized checkpoint with --quantization int8 or int4 (weight-only, quantized at start), "
            f"or a GGUF file with --quantization auto")


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config, source: ModelSource, max_model_len: int, slots: SlotPool,
                 hooks: EngineHooks | None = None):
        check_supported(hf_config)
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.quantization = resolve_quantization(config.quantization, source.gguf_path, self.device)
        self.slots = slots
        self.block_size = config.block_size
        self.kernels = select_kernels(self.device, config.kernel_backend)   # on CPU: builds the LoRA op once
        with torch.device("meta"):
            model = model_class(hf_config)(hf_config, max_model_len, self.kernels)
        model = model.to_empty(device=self.device).to(self.dtype)
        model.load_hf_weights(load_state_dict(source.local_dir))
        model.init_rotary(self.dtype)
        blocks = served_blocks(model, self.quantization, source.gguf_path, hf_config)
        self.base_weight_bytes = pack_base_weights(model, config.max_num_seqs, self.quantization, blocks)
        head_copy = pack_output_head(model, config.max_num_seqs)
        log.info("base projection weights: %.1f MB (%s, quantization %s)%s", self.base_weight_bytes / 2**20,
                 self.dtype, self.quantization,
                 f"; a packed copy of the tied output embedding: {head_copy / 2**20:.1f} MB" if head_copy else "")
        model.attach_lora(slots.layers)
        slots.bind_base(functools.partial(adapter_extras.base_weight, model))   # DoRA's norms read the served W
        self.model = model.eval()
        self.num_blocks = config.num_kv_blocks or self._blocks_for_budget(hf_config, config.kv_cache_memory)
        model.init_kv_cache(self.num_blocks + 1, self.block_size)   # + the scratch block of graph padding
        self.hooks = hooks or EngineHooks()
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and not config.enforce_eager and self.kernels.name == "triton":
            self.graphs = self.make_decode_graphs(max_model_len, capture=True)

    def make_decode_graphs(self, max_model_len: int, capture: bool) -> DecodeGraphs:
        """Decode batches up to min(max_num_seqs, 256) replay captured graphs; larger ones
        run eagerly. The scratch block (index num_blocks) holds the padding rows."""
        graphs = DecodeGraphs(self.model, min(self.config.max_num_seqs, 256), -(-max_model_len // self.block_size),
                              self.num_blocks, self.block_size, self.config.max_loras, capture)
        with torch.inference_mode():
            graphs.capture_all()
        log.info("captured decode graphs for batch sizes %s", graphs.buckets)
        return graphs

    def _blocks_for_budget(self, hf_config, budget: int) -> int:
        per_token = 2 * hf_config.num_hidden_layers * hf_config.num_key_value_heads * self.model.head_dim
        per_block = per_token * self.block_size * torch.finfo(self.dtype).bits // 8
        return max(1, budget // per_block)

    @torch.inference_mode()
    def run(self, inputs: list[StepInput]) -> tuple[list[Sequence], torch.Tensor]:
        """Prefill chunks (several tokens) are packed first, then decodes (one token), each
        group ordered by adapter slot so LoRA segments are contiguous runs of tokens."""
        by_slot = sorted(inputs, key=lambda i: i.slot)
        prefill = [i for i in by_slot if i.num_tokens > 1]
        decode = [i for i in by_slot if i.num_tokens == 1]
        ordered = prefill + decode
        ids, positions, kv_slots, token_slots, sample_idx, sample_seqs = [], [], [], [], [], []
        for item in ordered:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_tokens
            ids.extend(seq.token_ids()[start:end])
            positions.extend(range(start, end))
            kv_slots.extend(seq.block_table[p // self.block_size] * self.block_size + p % self.block_size
                         for p in range(start, end))
            token_slots.extend([item.slot] * item.num_tokens)
            if seq.needs_token_after(item.num_tokens):
                sample_idx.append(len(ids) - 1)
                sample_seqs.append(seq)
        decode_lens = [i.seq.num_computed_tokens + 1 for i in decode]
        extras = adapter_extras.step_extras(self.slots, token_slots, sample_idx, self.device)
        # steps with DoRA / embed_tokens / lm_head adapters run eagerly: the graphs hold none of it
        if not prefill and extras is None and self.graphs is not None and self.graphs.bucket(len(decode)):
            step = DecodeInputs(ids, positions, kv_slots, [i.seq.block_table for i in decode], decode_lens,
                                token_slots, self.slots.ranks)
            hidden = self.graphs.run(step)
        else:
            batch = self._forward_batch(prefill, decode, decode_lens, positions, kv_slots, token_slots)
            batch.extras = extras
            hidden = self.model(self._tensor(ids), batch)
        logits = self.model.compute_logits(hidden[self._tensor(sample_idx)], extras)
        if self.hooks.on_logits is not None:
            self.hooks.on_logits(sample_seqs, logits)
        return sample_seqs, logits

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    def _block_tables(self, items: list[StepInput]) -> torch.Tensor:
        width = max((len(i.seq.block_table) for i in items), default=0)
        rows = [i.seq.block_table + [0] * (width - len(i.seq.block_table)) for i in items]
        return torch.tensor(rows, dtype=torch.int64, device=self.device).view(len(items), width)

    def _forward_batch(self, prefill, decode, decode_lens, positions, kv_slots, token_slots) -> ForwardBatch:
        return ForwardBatch(
            positions=self._tensor(positions),
            slot_mapping=self._tensor(kv_slots),
            num_prefill_tokens=sum(i.num_tokens for i in prefill),
            prefill_query_lens=[i.num_tokens for i in prefill],
            prefill_context_lens=[i.seq.num_computed_tokens + i.num_tokens for i in prefill],
            prefill_block_tables=self._block_tables(prefill),
            decode_block_tables=self._block_tables(decode),
            decode_context_lens=self._tensor(decode_lens),
            decode_max_context_len=max(decode_lens, default=0),
            lora=self.kernels.lora_meta(token_slots, self.slots.ranks, self.device),
        )
