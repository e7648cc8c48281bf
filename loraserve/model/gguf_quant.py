"""A GGUF base served from its own quantized blocks, not dequantized to bf16 first.

Q4_0 and Q4_1 blocks (32 weights: an f16 scale, Q4_1 also an f16 minimum, 16 bytes of
nibbles) are exactly torch's grouped int4 form with group 32: Q4_1's w = d*q + m is
(q - 8)*d + (m + 8d), Q4_0's w = d*(q - 8). The codes are taken as they are, so the served
weights are the file's weights, not a second rounding of them. Q8_0 has no per-block int8
kernel in torch: it is requantized per channel from its exact dequantization (a log
line says so), and so is every other block type.

Names come from the gguf package's own tensor-name map and row orders from transformers'
GGUF tensor processors (llama's q/k rows are permuted in the file), applied to an index
vector, so a family whose processor changes values rather than order falls back to the
dense weights instead of serving wrong rows.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .quantize import QuantizedRows, stack_rows

log = logging.getLogger(__name__)

NATIVE_INT4 = {"Q4_0": 18, "Q4_1": 20}     # block type -> bytes per block of 32 weights
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}


def file_precision(gguf_path: str) -> str:
    """`--quantization auto` for this file: int4 for 4-bit-or-less projection blocks, int8
    for 5- to 8-bit ones, none for float tensors (the most common type among the blocks)."""
    from gguf import GGUFReader

    types = [t.tensor_type.name for t in GGUFReader(gguf_path).tensors if t.name.startswith("blk.")
             and t.name.rsplit(".", 2)[-2] in _GGUF_PROJECTIONS]
    if not types:
        return "none"
    common = max(set(types), key=types.count)
    if common in FLOAT_TYPES:
        return "none"
    return "int4" if any(f"Q{b}" in common or f"IQ{b}" in common for b in (1, 2, 3, 4)) else "int8"


_GGUF_PROJECTIONS = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}


def gguf_int4_blocks(gguf_path: str, hf_config) -> dict[str, QuantizedRows]:
    """HF tensor name -> its Q4_0/Q4_1 blocks as QuantizedRows, for every projection the
    file stores that way; other block types are left out (the caller quantizes them)."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS

    reader = gguf.GGUFReader(gguf_path)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, hf_config.num_hidden_layers)
    processor = TENSOR_PROCESSORS.get(arch)
    processor = processor(config={"num_attention_heads": hf_config.num_attention_heads,
                                  "num_key_value_heads": hf_config.num_key_value_heads}) if processor else None
    tensors = {t.name: t for t in reader.tensors}
    out, skipped = {}, {}
    for i in range(hf_config.num_hidden_layers):
        for module in PROJECTIONS:
            hf_key = f"model.layers.{i}.{module}.weight"
            gguf_name = names.get_name(hf_key, try_suffixes=(".weight",))
            t = tensors.get(gguf_name or "")
            if t is None:
                continue
            kind = t.tensor_type.name
            rows = _row_order(processor, t.name, t.data.shape[0])
            if kind not in NATIVE_INT4 or rows is None:
                key = kind if rows is not None else f"{kind} (its processor changes values)"
                skipped[key] = skipped.get(key, 0) + 1
                continue
            q = _int4_rows(np.asarray(t.data), kind)
            out[hf_key] = q if rows is _IDENTITY else _take_rows(q, rows)
    for kind, n in skipped.items():
        log.info("GGUF %s: %d projection tensors of type %s are quantized again from their "
                 "dequantized weights (no torch kernel takes their blocks as they are)", gguf_path, n, kind)
    return out


_IDENTITY = object()


def _row_order(processor, name: str, num_rows: int):
    """The HF row order of a GGUF tensor's rows: _IDENTITY, an index array, or None when
    the family's processor does more than reorder rows."""
    if processor is None:
        return _IDENTITY
    index = np.arange(num_rows, dtype=np.float64)[:, None]
    moved = np.asarray(processor.process(index, name).weights)
    order = moved[:, 0].astype(np.int64)
    if moved.shape != index.shape or not np.array_equal(np.sort(order), np.arange(num_rows)) \
            or not np.array_equal(order, moved[:, 0]):
        return None
    return _IDENTITY if np.array_equal(order, np.arange(num_rows)) else torch.from_numpy(order)


def _take_rows(q: QuantizedRows, rows: torch.Tensor) -> QuantizedRows:
    return QuantizedRows(q.bits, q.codes[rows], q.scales[rows], q.zeros[rows], q.group)


def _int4_rows(data: np.ndarray, kind: str) -> QuantizedRows:
    """One tensor's blocks ([rows, n_blocks * block_bytes] uint8) as int4 codes, group 32."""
    block = NATIVE_INT4[kind]
    num_rows = data.shape[0]
    blocks = data.reshape(num_rows, -1, block)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    nibbles = blocks[..., block - 16:]
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)     # ggml: low nibbles first
    if kind == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        zeros = m + 8 * d
    else:
        zeros = np.zeros_like(d)
    return QuantizedRows(4, torch.from_numpy(codes.reshape(num_rows, -1).astype(np.uint8)),
                         torch.from_numpy(d), torch.from_numpy(zeros), 32)


def model_blocks(model, hf_blocks: dict[str, QuantizedRows]) -> dict[str, QuantizedRows]:
    """Module name of each LoRA projection (e.g. layers.0.attn.qkv) -> its fused rows, for
    the projections whose every part the file holds as int4 blocks."""
    out = {}
    for i in range(len(model.layers)):
        for param, keys in model.layer_sources(i).items():
            module = param.removesuffix(".weight")
            if param.endswith(".weight") and all(k in hf_blocks for k in keys):
                out[f"layers.{i}.{module}"] = stack_rows([hf_blocks[k] for k in keys])
    return out
