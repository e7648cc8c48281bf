"""Validation of a PEFT `adapter_config.json`: what loraserve can serve and what it refuses.

Only plain LoRA on the seven Llama-family projections is served; every PEFT feature
that changes the math beyond `y += (x @ A.T @ B.T) * scaling` is refused by name, so
a user learns why before anything is stored.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass

from .base_spec import ADAPTER_MODULES, LORA_MODULES, BaseModelSpec
from .errors import AdapterRejected

logger = logging.getLogger(__name__)


def _is_set(value) -> bool:
    # layers_to_transform=0 is a valid PEFT value, so truthiness is not enough.
    return value is not None and value != [] and value != {}


# (config field, is the feature used?, what it is, what to do instead)
_UNSUPPORTED = (
    ("use_dora", bool, "DoRA (use_dora=true)", "train a plain LoRA, or merge the DoRA adapter into the base"),
    ("modules_to_save", bool, "modules_to_save (full copies of base modules)",
     "train without modules_to_save, or merge the adapter into the base model"),
    ("rank_pattern", bool, "per-module ranks (rank_pattern)", "train with one r for all modules"),
    ("alpha_pattern", bool, "per-module alphas (alpha_pattern)", "train with one lora_alpha for all modules"),
    ("layers_to_transform", _is_set, "layers_to_transform", "train LoRA on all layers"),
    ("layer_replication", _is_set, "layer_replication", "train without layer_replication"),
    ("fan_in_fan_out", bool, "fan_in_fan_out=true (GPT-2 Conv1D layout)",
     "Llama-family models use nn.Linear; train with fan_in_fan_out=false"),
    ("lora_bias", bool, "lora_bias=true", "train with lora_bias=false"),
    ("use_qalora", bool, "QA-LoRA (use_qalora=true)", "train a plain LoRA"),
    ("target_parameters", _is_set, "target_parameters", "target modules by name with target_modules"),
    ("trainable_token_indices", _is_set, "trainable_token_indices", "train without trainable tokens"),
    ("alora_invocation_tokens", _is_set, "activated LoRA (alora_invocation_tokens)", "train a plain LoRA"),
)


@dataclass(frozen=True)
class LoraHyper:
    """The few numbers of a validated config that the serving math needs."""

    rank: int
    alpha: float
    use_rslora: bool
    target_modules: object  # list[str] as written, or a str (a regex, or "all-linear")

    @property
    def scaling(self) -> float:
        # Exactly PEFT's LoraLayer.update_layer: rsLoRA divides by sqrt(r), not r.
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank


def parse_config_json(config_json: bytes) -> dict:
    """Parse adapter_config.json bytes, refusing anything that is not a JSON object."""
    try:
        config = json.loads(config_json)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterRejected(f"adapter_config.json is not valid JSON ({e}); "
                              "re-save the adapter with PeftModel.save_pretrained") from None
    if not isinstance(config, dict):
        raise AdapterRejected("adapter_config.json must hold a JSON object, as PeftModel.save_pretrained writes it")
    return config


def check_config(config: dict, spec: BaseModelSpec) -> LoraHyper:
    """Validate one parsed config against the served base; return its LoRA numbers."""
    peft_type = config.get("peft_type")
    if str(peft_type).upper() != "LORA":
        raise AdapterRejected(f"peft_type is {peft_type!r}; loraserve serves LoRA adapters only (peft_type 'LORA')")
    for field, used, what, fix in _UNSUPPORTED:
        if used(config.get(field)):
            raise AdapterRejected(f"adapter uses {what}, which loraserve does not support; {fix}")
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise AdapterRejected(f"bias={bias!r} is not supported (it trains base biases); train with bias='none'")
    _check_base_name(config, spec)
    targets = config.get("target_modules")
    if isinstance(targets, (list, tuple)):
        _check_target_names(targets)
    elif not isinstance(targets, str):
        raise AdapterRejected("adapter_config.json has no target_modules; "
                              f"re-save it with PEFT, targeting some of {', '.join(LORA_MODULES)}")
    return LoraHyper(_check_rank(config, spec), _check_alpha(config), bool(config.get("use_rslora")), targets)


def _check_rank(config: dict, spec: BaseModelSpec) -> int:
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise AdapterRejected(f"r={rank!r} in adapter_config.json is not a positive integer; re-save the adapter with PEFT")
    if rank > spec.max_lora_rank:
        raise AdapterRejected(f"rank {rank} exceeds max_lora_rank {spec.max_lora_rank}; "
                              f"restart with --max-lora-rank {rank}")
    return rank


def _check_alpha(config: dict) -> float:
    alpha = config.get("lora_alpha")
    ok = isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0
    if not ok:
        raise AdapterRejected(f"lora_alpha={alpha!r} in adapter_config.json must be a positive number; "
                              "set lora_alpha (PEFT's default is 8) and re-save")
    return float(alpha)


def _check_target_names(targets) -> None:
    # PEFT matches list entries as dotted suffixes ("self_attn.q_proj"), so judge the last part.
    for target in targets:
        module = str(target).rsplit(".", 1)[-1]
        if module not in ADAPTER_MODULES:
            raise AdapterRejected(f"target module {target!r} is not supported; loraserve applies LoRA "
                                  f"to {', '.join(LORA_MODULES)} only: retrain without {module!r}")


def _check_base_name(config: dict, spec: BaseModelSpec) -> None:
    # Hub ids and local paths of one model differ legitimately: warn, never refuse.
    name = config.get("base_model_name_or_path")
    if name and spec.base_model_id and name != spec.base_model_id:
        logger.warning("adapter was trained on %r but the served base is %r; shapes match, serving it anyway",
                       name, spec.base_model_id)


def check_targets_cover(targets, module_paths: dict[str, str]) -> None:
    """Refuse weights that target_modules does not name: config and file disagree.

    `module_paths` maps each weight's module path ("model.layers.0.self_attn.q_proj")
    to the tensor key it came from. A string target is a regex that PEFT fullmatches
    against those paths, or "all-linear".
    """
    if targets == "all-linear":
        return
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise AdapterRejected(f"target_modules regex {targets!r} does not compile ({e}); fix adapter_config.json")
        unmatched = [key for path, key in module_paths.items() if not pattern.fullmatch(path)]
        what = f"the target_modules regex {targets!r}"
    else:
        named = {str(t).rsplit(".", 1)[-1] for t in targets}
        unmatched = [key for path, key in module_paths.items() if path.rsplit(".", 1)[-1] not in named]
        what = f"target_modules {sorted(named)}"
    if unmatched:
        raise AdapterRejected(f"tensor {unmatched[0]} is not covered by {what}; "
                              "adapter_config.json and the weights disagree: re-save the adapter with PEFT")
