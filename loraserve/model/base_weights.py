"""How a projection's base weight is stored and multiplied: the one seam between the model
and the matmul library, rewritten once after loading (`pack_base_weights`).

- `PlainWeight`: `F.linear` on the [out, in] matrix as loaded (CUDA, fp32, fp16).
- `Int8Weight` / `Int4Weight`: weight-only quantized (`--quantization`, quantize.py) on
  CPU through torch's packed-weight kernels (`_weight_int8pack_mm`,
  `_weight_int4pack_mm_for_cpu`); activations stay in the model dtype.
- `PackedWeight`: bf16 and fp32 on CPU, packed once into oneDNN's blocked layout.
  bf16: torch's `F.linear` hands a bf16 matmul to oneDNN, which reorders the weight on
  every call; at decode shapes (M = the batch's tokens, K and N of a 135M model) that
  reorder is a fifth of the call. Packed once (`mkldnn._reorder_linear_weight`,
  `mkldnn._linear_pointwise`) the result is the same bit for bit. fp32: `F.linear` goes
  to MKL's sgemm, which on this project's AMD EPYC runs 2.2-2.5x slower than oneDNN's
  fp32 kernels at every shape measured (M = 64 to 2048; benchmarks/matmul_cpu.py); the
  results differ from MKL's in the last bits only (another summation order, ~1e-4 on
  outputs of size ~10).

Every format keeps one copy of the weight (the loaded Parameter is dropped; the bias,
which DoRA's rescale also reads, stays shared) and can give
the dense matrix back (`dense()`) for the rare readers of W: DoRA's column norms at
adapter load time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .quantize import BITS, QuantizedRows, quantize


class PlainWeight:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def dense(self) -> torch.Tensor:
        return self.weight

    @property
    def nbytes(self) -> int:
        return _nbytes(self.weight) + _nbytes(self.bias)


class PackedWeight:
    """oneDNN's blocked layout, packed for `batch_hint` rows (any row count works)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batch_hint: int):
        self.shape, self.dtype = weight.shape, weight.dtype
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch_hint)
        self.bias = bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def dense(self) -> torch.Tensor:
        return self.packed.to_dense()

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize + _nbytes(self.bias)


class _QuantizedWeight:
    """The part the int8 and int4 formats share: a library matmul on codes kept in its
    packed form only (no second, unpacked copy), the bias after it, and dense() read back
    through that same matmul, so DoRA's norms see exactly the weights that are served."""

    bias: torch.Tensor | None
    dtype: torch.dtype
    in_features: int

    def _mm(self, x2d: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self._mm(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias

    def dense(self) -> torch.Tensor:
        """W [out, in]: the matmul of the identity, 1024 rows of it at a time."""
        eye = torch.eye(self.in_features, dtype=self.dtype)
        return torch.cat([self._mm(eye[i : i + 1024].contiguous()) for i in range(0, self.in_features, 1024)]).t()


class Int8Weight(_QuantizedWeight):
    """int8 codes per output channel; y = (x @ codes^T) * scale, in x's dtype."""

    def __init__(self, q: QuantizedRows, bias: torch.Tensor | None, dtype: torch.dtype):
        self.bias, self.dtype, self.in_features = bias, dtype, q.codes.shape[1]
        self.codes = q.codes.contiguous()
        self.scales = q.scales.view(-1).to(dtype)

    def _mm(self, x2d: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x2d, self.codes, self.scales)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.codes) + _nbytes(self.scales) + _nbytes(self.bias)


class Int4Weight(_QuantizedWeight):
    """int4 codes in groups along the input, packed once into the CPU kernel's layout."""

    def __init__(self, q: QuantizedRows, bias: torch.Tensor | None, dtype: torch.dtype):
        self.bias, self.dtype, self.in_features, self.group = bias, dtype, q.codes.shape[1], q.group
        self.packed = torch._convert_weight_to_int4pack_for_cpu(q.codes.to(torch.int32).contiguous(), 2)
        # [in // group, out, 2]: (scale, zero) pairs, the kernel's form
        self.scales_and_zeros = torch.stack([q.scales, q.zeros], dim=-1).transpose(0, 1).contiguous().to(dtype)

    def _mm(self, x2d: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x2d, self.packed, self.group, self.scales_and_zeros)

    @property
    def nbytes(self) -> int:
        return _nbytes(self.packed) + _nbytes(self.scales_and_zeros) + _nbytes(self.bias)


BaseWeight = PlainWeight | PackedWeight | Int8Weight | Int4Weight


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """fp32 on a CPU with oneDNN; bf16 where its oneDNN build runs bf16 matmuls (AVX512-BF16 or AMX)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def has_amx() -> bool:
    """Whether this CPU has AMX tiles (oneDNN's bf16 matmuls run on them)."""
    return getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def pack_base_weights(model: torch.nn.Module, batch_hint: int, quantization: str = "none",
                      quantized: dict[str, QuantizedRows] | None = None) -> int:
    """Give every LoRA projection of `model` its base-weight format, dropping the loaded
    Parameters; returns the weight bytes. `quantization` int8/int4 quantizes each
    projection (from `quantized[name]` when given: a GGUF file's own blocks, else from
    its dense weight); none packs where `can_pack`, else plain."""
    from .layers import LoRAProjection

    total = 0
    for name, proj in model.named_modules():
        if not isinstance(proj, LoRAProjection):
            continue
        weight = proj.weight.detach()
        bias = None if proj.bias is None else proj.bias.detach()
        if quantization in BITS:
            try:
                q = (quantized or {}).get(name) or quantize(weight, BITS[quantization])
                proj.base = (Int8Weight if q.bits == 8 else Int4Weight)(q, bias, weight.dtype)
            except (RuntimeError, ValueError) as e:   # a shape the kernel does not take (int4: out % 16)
                raise ValueError(f"--quantization {quantization} cannot pack projection {name} of shape "
                                 f"{tuple(weight.shape)}: {e}; use --quantization int8 or none") from e
        elif can_pack(weight.device, weight.dtype):
            proj.base = PackedWeight(weight, bias, batch_hint)
        else:
            proj.base = PlainWeight(weight, bias)
        del proj.weight                       # one copy: the format's (the bias, small, stays shared)
        total += proj.base.nbytes
    return total


def pack_output_head(model, batch_hint: int) -> int:
    """Give the logits matmul a packed format where it pays; returns the bytes it adds.
    An untied lm_head is packed in place (no added bytes). A tied one must stay dense for
    the embedding lookups, so packing it is a second copy of vocab x hidden: kept for fp32,
    where oneDNN's matmul is 2.2-2.5x MKL's (AVX512 without AMX), and for bf16 on a CPU with
    AMX (1.8-2.3x at batches 1-128, about 4% of a decode step); not for bf16 without AMX
    (1.1-1.2x at decode batches)."""
    weight = model.output_weight()
    if not can_pack(weight.device, weight.dtype):
        return 0
    if model.tie and not (weight.dtype == torch.float32 or has_amx()):
        return 0
    model.head = PackedWeight(weight, None, batch_hint)
    if model.tie:
        return model.head.nbytes
    del model.lm_head.weight                  # one copy: the packed one
    return 0
