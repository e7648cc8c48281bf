"""Weight-only quantization of the base's projections: int8 per output channel, int4 in
groups along the input, as codes plus scales that any format (base_weights.py) can pack.

Why weight-only: activations and the LoRA delta stay in the activation dtype, so every
adapter serves unchanged on a quantized base, and the base's weight bytes (what a decode
step streams) fall to ~0.5x (int8) and ~0.28-0.31x (int4) of bf16.

`QuantizedRows` is the one interchange shape: a GGUF file's Q4_0/Q4_1 blocks
(gguf_quant.py) and a dense weight quantized here both become one, and the fused
projections (q,k,v -> qkv) are their rows stacked (`stack_rows`), since int4 groups run
along the input dimension, never across rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

INT4_GROUP_SIZES = (128, 64, 32)                   # the largest that divides in_features is used


@dataclass
class QuantizedRows:
    """w[n, k] = (codes[n, k] - offset) * scales[n, k // group] + zeros[n, k // group].

    int8: codes int8, offset 0, one group per row (group = in_features), no zeros.
    int4: codes uint8 in 0..15, offset 8, zeros per group (torch's int4 kernels' form)."""
    bits: int
    codes: torch.Tensor        # [out, in]
    scales: torch.Tensor       # [out, in // group], fp32
    zeros: torch.Tensor | None  # [out, in // group], fp32; None = symmetric
    group: int

    @property
    def offset(self) -> int:
        return 8 if self.bits == 4 else 0

    def dequantize(self) -> torch.Tensor:
        """The fp32 matrix these codes stand for: what the reference runs."""
        n, k = self.codes.shape
        groups = (self.codes.float() - self.offset).view(n, k // self.group, self.group)
        w = groups * self.scales[..., None]
        if self.zeros is not None:
            w = w + self.zeros[..., None]
        return w.view(n, k)


def stack_rows(parts: list[QuantizedRows]) -> QuantizedRows:
    """The fused projection's rows (q then k then v): same bits and group in every part."""
    first = parts[0]
    if any(p.bits != first.bits or p.group != first.group for p in parts):
        raise ValueError("fused projection parts are quantized differently: "
                         f"{[(p.bits, p.group) for p in parts]}")
    zeros = None if first.zeros is None else torch.cat([p.zeros for p in parts])
    return QuantizedRows(first.bits, torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                         zeros, first.group)


def quantize_int8(w: torch.Tensor) -> QuantizedRows:
    """Symmetric, per output channel, round to nearest: scale = max|w_row| / 127."""
    w = w.float()
    scales = (w.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)
    codes = (w / scales).round().clamp(-127, 127).to(torch.int8)
    return QuantizedRows(8, codes, scales, None, w.shape[1])


def int4_group(in_features: int) -> int:
    for group in INT4_GROUP_SIZES:
        if in_features % group == 0:
            return group
    raise ValueError(f"int4 needs in_features divisible by {INT4_GROUP_SIZES[-1]}, got {in_features}")


def quantize_int4(w: torch.Tensor, group: int | None = None) -> QuantizedRows:
    """Asymmetric per group of `group` inputs (min/max to 0..15), round to nearest."""
    w = w.float()
    n, k = w.shape
    group = group or int4_group(k)
    g = w.view(n, k // group, group)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=1e-12)
    codes = ((g - lo[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.uint8)
    # (q - 8) * s + z == q * s + lo  with  z = lo + 8 s
    return QuantizedRows(4, codes.view(n, k), scales, lo + 8 * scales, group)


def quantize(w: torch.Tensor, bits: int) -> QuantizedRows:
    return quantize_int8(w) if bits == 8 else quantize_int4(w)


BITS = {"int8": 8, "int4": 4}


def resolve_quantization(value: str, gguf_path: str | None, device: torch.device) -> str:
    """`auto` made concrete (a GGUF file's own precision, else none), checked against the
    device: a quantization it cannot run is an error at start, not at the first step."""
    if value == "auto":
        from .gguf_quant import file_precision

        value = file_precision(gguf_path) if gguf_path else "none"
    if value != "none" and device.type != "cpu":
        raise ValueError(f"--quantization {value} runs on CPU only (torch's packed int8/int4 CPU kernels); "
                         f"on {device.type} use --quantization none")
    return value


def served_blocks(model, quantization: str, gguf_path: str | None, hf_config) -> dict[str, QuantizedRows]:
    """Module name -> the quantized rows a GGUF file already holds for that projection
    (int4 from Q4_0/Q4_1 blocks); what is not in it is quantized from the dense weights."""
    if gguf_path is None or quantization != "int4":
        if gguf_path is not None and quantization == "int8":
            log.info("int8 from %s: its blocks are quantized again per output channel from their exact "
                     "dequantization (torch has no per-block int8 kernel)", gguf_path)
        return {}
    from .gguf_quant import gguf_int4_blocks, model_blocks

    return model_blocks(model, gguf_int4_blocks(gguf_path, hf_config))
