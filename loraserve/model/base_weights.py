"""How a projection's base weight is stored and multiplied: the one seam between the model
and the matmul library, rewritten once after loading (`pack_base_weights`).

- `PlainWeight`: `F.linear` on the [out, in] matrix as loaded (CUDA, fp32, fp16).
- `PackedWeight`: bf16 on CPU. torch's `F.linear` hands a bf16 matmul to oneDNN, which
  reorders the weight into its blocked layout on every call; at decode shapes (M = the
  batch's tokens, K and N of a 135M model) that reorder is a fifth of the call. Packing
  once (`mkldnn._reorder_linear_weight`) and calling `mkldnn._linear_pointwise` gives the
  same result bit for bit, without the per-call reorder. fp32 stays plain: MKL's packed
  sgemm measured no faster here (benchmarks/RESULTS.md, "Matmuls").

Every format keeps one copy of the weight (the loaded Parameter is dropped; the bias,
which DoRA's rescale also reads, stays shared) and can give
the dense matrix back (`dense()`) for the rare readers of W: DoRA's column norms at
adapter load time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


BaseWeight = PlainWeight | PackedWeight


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """bf16 on a CPU whose oneDNN build runs bf16 matmuls (AVX512-BF16 or AMX)."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_base_weights(model: torch.nn.Module, batch_hint: int) -> int:
    """Give every LoRA projection of `model` its base-weight format (packed where
    `can_pack`, else plain), dropping the loaded Parameters. Returns the weight bytes."""
    from .layers import LoRAProjection

    total = 0
    for proj in model.modules():
        if not isinstance(proj, LoRAProjection):
            continue
        weight = proj.weight.detach()
        bias = None if proj.bias is None else proj.bias.detach()
        if can_pack(weight.device, weight.dtype):
            proj.base = PackedWeight(weight, bias, batch_hint)
        else:
            proj.base = PlainWeight(weight, bias)
        del proj.weight                       # one copy: the format's (the bias, small, stays shared)
        total += proj.base.nbytes
    return total
