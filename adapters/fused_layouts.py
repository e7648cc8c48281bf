"""Adapters trained on fused projections (Phi-3's qkv_proj, gate_up_proj), split into
the per-projection layout the slot pool stores (q_proj, k_proj, v_proj; gate_proj,
up_proj), once, at load time.

A LoRA on a fused projection is y[:, cols] += x A^T B^T * s over all its columns: the
columns of q, k, v are consecutive ranges of the fused output, so each part keeps the
shared A and takes its own rows of B. Nothing is approximated:
    qkv_proj: A [r, h], B [q + 2 kv, r] -> q_proj (A, B[:q]), k_proj (A, B[q:q+kv]), v_proj (A, B[q+kv:])
"""

from __future__ import annotations

import torch

from .base_spec import FUSED_MODEL_TYPES, FUSED_MODULES, BaseModelSpec
from .errors import AdapterRejected

Weights = dict[tuple[int, str], torch.Tensor]


def split_fused(lora_a: Weights, lora_b: Weights, spec: BaseModelSpec,
                magnitude: Weights | None = None) -> tuple[Weights, Weights, Weights]:
    """(lora_a, lora_b, magnitude) with every fused module replaced by its parts; refuses
    module names that the served architecture does not have (q_proj on Phi-3, qkv_proj on
    Llama). DoRA's magnitude is per output row, like B, so it splits by the same rows (its
    rescale m / ||W + sBA|| is row by row too)."""
    magnitude = magnitude or {}
    allowed = spec.adapter_modules
    for _, module in lora_a:
        if module not in allowed:
            raise AdapterRejected(f"LoRA on {module!r} does not fit the served base ({spec.model_type}), whose "
                                  f"projections are {', '.join(allowed)}; this adapter was trained on another "
                                  "architecture")
    out_a, out_b, out_m = {}, {}, {}
    for (layer, module), a in lora_a.items():
        b = lora_b[layer, module]
        parts = FUSED_MODULES.get(module, (module,))
        widths = [spec.module_shape(p)[1] for p in parts]
        for part, rows in zip(parts, b.split(widths, dim=0)):
            out_a[layer, part], out_b[layer, part] = a, rows.contiguous()
        if (layer, module) in magnitude:
            for part, m in zip(parts, magnitude[layer, module].split(widths)):
                out_m[layer, part] = m.contiguous()
    return out_a, out_b, out_m


def model_targets(model_type: str, targets: tuple[str, ...]) -> list[str]:
    """Fine-tuning targets in the names of the model's own modules: on Phi-3 a request for
    any of q,k,v (gate, up) trains the fused qkv_proj (gate_up_proj), which has no parts;
    elsewhere a fused name trains its parts."""
    if model_type in FUSED_MODEL_TYPES:
        fused_of = {part: fused for fused, parts in FUSED_MODULES.items() for part in parts}
        names = [fused_of.get(t, t) for t in targets]
    else:
        names = [part for t in targets for part in FUSED_MODULES.get(t, (t,))]
    return list(dict.fromkeys(names))
