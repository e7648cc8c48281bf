"""The parts of a PEFT adapter that live on the vocabulary-sized modules, embed_tokens and
lm_head, plus DoRA's magnitude vectors: read from `adapter_model.safetensors` and checked
against the served base.

PEFT's keys (after `base_model.model.`):
`model.embed_tokens.lora_embedding_A`                        # [r, vocab]: transposed vs nn.Linear's lora_A
`model.embed_tokens.lora_embedding_B`                        # [hidden, r]
`lm_head.lora_A.weight` / `lm_head.lora_B.weight`             # [r, hidden] / [vocab, r]
`lm_head.lora_magnitude_vector`, `model.layers.{i}.{group}.{m}.lora_magnitude_vector`  # DoRA: [out]
`model.embed_tokens.weight`, `lm_head.weight`                 # modules_to_save: full copies
`model.embed_tokens.token_adapter.trainable_tokens_delta`     # trainable tokens: [n, hidden] new rows
`*.base_layer.weight`                                         # save_embedding_layers: the base's own matrix
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

import torch

from .base_spec import BaseModelSpec
from .errors import AdapterRejected

_PREFIX = r"^(?:base_model\.model\.)?"
_VOCAB_KEYS = {
    "embed_a": _PREFIX + r"(?:model\.)?embed_tokens\.lora_embedding_A$",
    "embed_b": _PREFIX + r"(?:model\.)?embed_tokens\.lora_embedding_B$",
    "head_a": _PREFIX + r"lm_head\.lora_A\.weight$",
    "head_b": _PREFIX + r"lm_head\.lora_B\.weight$",
    "head_magnitude": _PREFIX + r"lm_head\.lora_magnitude_vector$",
    "embed_copy": _PREFIX + r"(?:model\.)?embed_tokens\.weight$",
    "head_copy": _PREFIX + r"lm_head\.weight$",
    "token_rows": _PREFIX + r"(?:model\.)?embed_tokens\.token_adapter\.trainable_tokens_delta$",
    "base_copy": _PREFIX + r"(?:model\.)?(?:embed_tokens|lm_head)\.base_layer\.weight$",
}
_VOCAB_RES = {name: re.compile(p) for name, p in _VOCAB_KEYS.items()}
LAYER_MAGNITUDE = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(?P<layer>\d+)\."
                             r"(?:self_attn|mlp)\.(?P<module>\w+)\.lora_magnitude_vector$")


@dataclass
class VocabWeights:
    """One adapter's weights on embed_tokens and lm_head, fp32 on the CPU; None where absent."""

    embed_a: torch.Tensor | None = None         # [r, vocab]  PEFT's lora_embedding_A
    embed_b: torch.Tensor | None = None         # [hidden, r]
    head_a: torch.Tensor | None = None          # [r, hidden]
    head_b: torch.Tensor | None = None          # [vocab, r]
    head_magnitude: torch.Tensor | None = None  # [vocab]     DoRA on lm_head
    embed_copy: torch.Tensor | None = None      # [vocab, hidden]  modules_to_save
    head_copy: torch.Tensor | None = None       # [vocab, hidden]  modules_to_save
    token_rows: torch.Tensor | None = None      # [n, hidden]  trainable tokens: the new embedding rows
    token_ids: tuple[int, ...] = ()             # the ids token_rows replace, in order

    def tensors(self) -> list[torch.Tensor]:
        return [t for f in fields(self) if isinstance(t := getattr(self, f.name), torch.Tensor)]

    @property
    def copy_bytes(self) -> int:
        """fp32 bytes of the full module copies (modules_to_save): what the copy budget counts."""
        return sum(t.numel() * 4 for t in (self.embed_copy, self.head_copy) if t is not None)

    @property
    def kinds(self) -> tuple[str, ...]:
        """What this adapter does beyond the projections, for its info."""
        kinds = [("embed_tokens LoRA", self.embed_a), ("lm_head LoRA", self.head_a),
                 ("embed_tokens copy", self.embed_copy), ("lm_head copy", self.head_copy),
                 ("trainable tokens", self.token_rows)]
        return tuple(name for name, t in kinds if t is not None)

    @property
    def is_empty(self) -> bool:
        return not self.tensors()


def split_vocab_keys(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(vocab-module tensors by field name, the rest by key), refusing duplicates."""
    vocab, rest = {}, {}
    for key, tensor in tensors.items():
        name = next((n for n, r in _VOCAB_RES.items() if r.match(key)), None)
        if name is None:
            rest[key] = tensor
        elif name == "base_copy":
            vocab.setdefault("base_copy", []).append((key, tensor))
        elif name in vocab:
            raise AdapterRejected(f"tensor {key} duplicates another {name} tensor; re-save the adapter with PEFT")
        else:
            vocab[name] = (key, tensor)
    return vocab, rest


def collect_vocab(found: dict, hyper, spec: BaseModelSpec) -> VocabWeights:
    """Check the vocab-module tensors against the config and the base; return them in fp32."""
    for key, tensor in found.pop("base_copy", []):
        # save_embedding_layers writes the base matrix itself; only its size tells anything
        _check_vocab_rows(key, tensor, spec)
    out = VocabWeights(token_ids=tuple(hyper.trainable_tokens))
    h, r, v = spec.hidden_size, hyper.rank, spec.vocab_size
    expected = {"embed_a": (r, v), "embed_b": (h, r), "head_a": (r, h), "head_b": (v, r), "head_magnitude": (v,),
                "embed_copy": (v, h), "head_copy": (v, h), "token_rows": (len(hyper.trainable_tokens), h)}
    for name, (key, tensor) in found.items():
        if name in ("embed_copy", "head_copy", "embed_a", "head_b", "head_magnitude"):
            _check_vocab_rows(key, tensor, spec, dim=1 if name == "embed_a" else 0)
        if tuple(tensor.shape) != expected[name]:
            raise AdapterRejected(f"tensor {key} has shape {list(tensor.shape)}, expected {list(expected[name])} "
                                  f"for the served base (hidden_size {h}, vocab {v}, r={r}); re-save with PEFT")
        tensor = tensor.to(dtype=torch.float32, device="cpu")
        if not torch.isfinite(tensor).all():
            raise AdapterRejected(f"tensor {key} contains NaN or inf values; the training diverged: retrain")
        setattr(out, name, tensor)
    _check_consistent(out, hyper, spec)
    return out


def _check_vocab_rows(key: str, tensor: torch.Tensor, spec: BaseModelSpec, dim: int = 0) -> None:
    if spec.vocab_size <= 0:
        raise AdapterRejected(f"tensor {key} is on embed_tokens or lm_head, but this server does not know the "
                              "base vocabulary size; serve the base from a directory with its config.json")
    if tensor.dim() < 1 or tensor.shape[dim] != spec.vocab_size:
        rows = tensor.shape[dim] if tensor.dim() > dim else "?"
        raise AdapterRejected(f"adapter resizes the vocabulary: tensor {key} has {rows} token rows, the served "
                              f"base has {spec.vocab_size}; loraserve serves the base's vocabulary only: retrain "
                              "without resize_token_embeddings (add tokens with trainable_token_indices over "
                              "existing ids), or merge the adapter and serve the merged model")


def _check_consistent(out: VocabWeights, hyper, spec: BaseModelSpec) -> None:
    for a, b, module in (("embed_a", "embed_b", "embed_tokens"), ("head_a", "head_b", "lm_head")):
        if (getattr(out, a) is None) != (getattr(out, b) is None):
            raise AdapterRejected(f"LoRA on {module} has only one of its A and B matrices; re-save with PEFT")
    if hyper.use_dora and out.head_a is not None and out.head_magnitude is None:
        raise AdapterRejected("use_dora is set but lm_head has no lora_magnitude_vector; re-save with PEFT")
    if out.head_magnitude is not None and not hyper.use_dora:
        raise AdapterRejected("lm_head has a DoRA magnitude vector but use_dora is not set; re-save with PEFT")
    for module, copy in (("embed_tokens", out.embed_copy), ("lm_head", out.head_copy)):
        if (copy is not None) != (module in hyper.modules_to_save):
            raise AdapterRejected(f"modules_to_save and the weights disagree on {module}; re-save with PEFT")
    if (out.token_rows is not None) != bool(hyper.trainable_tokens):
        raise AdapterRejected("trainable_token_indices and the weights disagree; re-save with PEFT")
    if out.copy_bytes > spec.max_module_copy_bytes:
        raise AdapterRejected(f"the modules_to_save copies need {out.copy_bytes} bytes, over this server's limit "
                              f"of {spec.max_module_copy_bytes} bytes per adapter; retrain without "
                              "modules_to_save (LoRA on embed_tokens/lm_head is far smaller), or restart "
                              f"with --max-module-copy-bytes {out.copy_bytes}")
