"""Validation of a PEFT `adapter_config.json`: what loraserve can serve and what it refuses.

Served: LoRA and rsLoRA on the seven Llama-family projections, DoRA (`use_dora`) on
those and on lm_head, LoRA on embed_tokens and lm_head, `modules_to_save` copies of
embed_tokens / lm_head, and trainable tokens of embed_tokens. Every other PEFT feature
is refused by name, so a user learns why before anything is stored.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass

from .base_spec import ADAPTER_MODULES, LORA_MODULES, BaseModelSpec

VOCAB_MODULES = ("embed_tokens", "lm_head")  # the vocabulary-sized modules adapters may touch
TARGETABLE = ADAPTER_MODULES + VOCAB_MODULES

# peft_type -> its name; none is served (each changes the math beyond LoRA's)
_OTHER_PEFT_TYPES = {"VERA": "VeRA", "LOHA": "LoHa", "LOKR": "LoKr", "IA3": "IA3", "ADALORA": "AdaLoRA",
                     "PROMPT_TUNING": "prompt tuning", "PREFIX_TUNING": "prefix tuning", "P_TUNING": "P-tuning",
                     "MULTITASK_PROMPT_TUNING": "multitask prompt tuning", "OFT": "OFT", "BOFT": "BOFT",
                     "FOURIERFT": "FourierFT", "LN_TUNING": "LayerNorm tuning", "POLY": "Poly",
                     "HRA": "HRA", "BONE": "Bone", "XLORA": "X-LoRA", "ADAPTION_PROMPT": "adaption prompt",
                     "CPT": "CPT", "VBLORA": "VB-LoRA", "RANDLORA": "RandLoRA", "SHIRA": "SHiRA", "C3A": "C3A"}
from .errors import AdapterRejected

logger = logging.getLogger(__name__)


def _is_set(value) -> bool:
    # layers_to_transform=0 is a valid PEFT value, so truthiness is not enough.
    return value is not None and value != [] and value != {}


# (config field, is the feature used?, what it is, what to do instead)
_UNSUPPORTED = (
    ("rank_pattern", bool, "per-module ranks (rank_pattern, as AdaLoRA and rank-pattern LoRA write them)",
     "train with one r for all modules, or merge the adapter into the base (PeftModel.merge_and_unload)"),
    ("alpha_pattern", bool, "per-module alphas (alpha_pattern)", "train with one lora_alpha for all modules"),
    ("layers_to_transform", _is_set, "layers_to_transform", "train LoRA on all layers"),
    ("layer_replication", _is_set, "layer_replication", "train without layer_replication"),
    ("fan_in_fan_out", bool, "fan_in_fan_out=true (GPT-2 Conv1D layout)",
     "Llama-family models use nn.Linear; train with fan_in_fan_out=false"),
    ("lora_bias", bool, "lora_bias=true", "train with lora_bias=false"),
    ("use_qalora", bool, "QA-LoRA (use_qalora=true)", "train a plain LoRA"),
    ("target_parameters", _is_set, "target_parameters", "target modules by name with target_modules"),
    ("alora_invocation_tokens", _is_set, "activated LoRA (alora_invocation_tokens)", "train a plain LoRA"),
)


@dataclass(frozen=True)
class LoraHyper:
    """The few numbers of a validated config that the serving math needs."""

    rank: int
    alpha: float
    use_rslora: bool
    target_modules: object  # list[str] as written, or a str (a regex, or "all-linear")
    use_dora: bool = False
    modules_to_save: tuple[str, ...] = ()  # subset of VOCAB_MODULES: full per-adapter copies
    trainable_tokens: tuple[int, ...] = ()  # token ids whose embedding rows the adapter replaces

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
        kind = _OTHER_PEFT_TYPES.get(str(peft_type).upper())
        what = f"a {kind} adapter (peft_type {peft_type!r})" if kind else f"peft_type {peft_type!r}"
        raise AdapterRejected(f"{what} is not served: loraserve serves LoRA adapters only (peft_type 'LORA', "
                              "incl. rsLoRA and DoRA); merge it into the base (PeftModel.merge_and_unload) and "
                              "serve the merged model, or retrain it as a LoRA adapter")
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
    use_dora = bool(config.get("use_dora"))
    if use_dora and _names_embed(targets):
        raise AdapterRejected("DoRA on embed_tokens is not served; retrain without embed_tokens in target_modules "
                              "(DoRA on the projections and lm_head is served)")
    return LoraHyper(_check_rank(config, spec), _check_alpha(config), bool(config.get("use_rslora")), targets,
                     use_dora, _check_modules_to_save(config), _check_trainable_tokens(config, spec))


def _names_embed(targets) -> bool:
    if isinstance(targets, str):
        return re.search(r"embed_tokens", targets) is not None
    return any(str(t).rsplit(".", 1)[-1] == "embed_tokens" for t in targets)


def _check_modules_to_save(config: dict) -> tuple[str, ...]:
    names = config.get("modules_to_save") or []
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise AdapterRejected(f"modules_to_save={names!r} must be a list of module names; re-save with PEFT")
    out = []
    for name in names:
        module = str(name).rsplit(".", 1)[-1]
        if module not in VOCAB_MODULES:
            raise AdapterRejected(f"modules_to_save names {name!r}; loraserve serves full copies of "
                                  f"{' and '.join(VOCAB_MODULES)} only: retrain without it in modules_to_save")
        out.append(module)
    return tuple(m for m in VOCAB_MODULES if m in out)


def _check_trainable_tokens(config: dict, spec: BaseModelSpec) -> tuple[int, ...]:
    """PEFT takes a list of ids (for embed_tokens) or {module: ids}."""
    value = config.get("trainable_token_indices")
    if not _is_set(value):
        return ()
    if isinstance(value, dict):
        others = [k for k in value if str(k).rsplit(".", 1)[-1] != "embed_tokens"]
        if others:
            raise AdapterRejected(f"trainable_token_indices names module {others[0]!r}; loraserve serves "
                                  "trainable tokens of embed_tokens only: retrain with a list of token ids")
        value = [i for ids in value.values() for i in ids]
    if not isinstance(value, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise AdapterRejected(f"trainable_token_indices={value!r} must be a list of token ids; re-save with PEFT")
    bad = [i for i in value if not 0 <= i < spec.vocab_size]
    if bad:
        raise AdapterRejected(f"trainable token id {bad[0]} is outside the served vocabulary of {spec.vocab_size} "
                              "tokens; this adapter was trained for a different (resized) vocabulary")
    return tuple(value)


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
        if module not in TARGETABLE:
            raise AdapterRejected(f"target module {target!r} is not supported; loraserve applies LoRA "
                                  f"to {', '.join(TARGETABLE)} only: retrain without {module!r}")


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
