"""Where an adapter comes from: a local directory, or `hf://org/repo[@revision]` on the Hub.

Each source resolves to a local directory in PEFT layout, which the store then reads
and validates like any other; only the two PEFT files are downloaded, never a pickle.
"""

from __future__ import annotations

import os

import huggingface_hub
from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

from .errors import AdapterError, AdapterRejected
from .peft_format import CONFIG_NAME, WEIGHTS_NAME

HF_SCHEME = "hf://"
FILE_SCHEME = "file://"


def fetch_source(source: str) -> str:
    """Return a local directory holding the adapter that `source` names."""
    if source.startswith(HF_SCHEME):
        return _fetch_hf(source)
    if source.startswith(FILE_SCHEME):
        source = source[len(FILE_SCHEME):]
    if "://" in source:
        raise AdapterRejected(f"adapter source {source!r} has an unsupported scheme; "
                              "use a local directory path or hf://org/repo[@revision]")
    return os.path.expanduser(source)


def parse_hf_source(source: str) -> tuple[str, str | None]:
    """`hf://org/repo@rev` -> ("org/repo", "rev"); the revision is None when omitted."""
    body = source[len(HF_SCHEME):]
    repo_id, at, revision = body.partition("@")
    parts = repo_id.split("/")
    if not (1 <= len(parts) <= 2 and all(parts)) or (at and not revision):
        raise AdapterRejected(f"adapter source {source!r} is malformed; write hf://org/repo or hf://org/repo@revision")
    return repo_id, revision or None


def _fetch_hf(source: str) -> str:
    repo_id, revision = parse_hf_source(source)
    try:
        # Looked up on the module at call time, so tests can stand a local directory in for the Hub.
        local_dir = huggingface_hub.snapshot_download(
            repo_id=repo_id, revision=revision, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME])
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as e:
        raise AdapterRejected(f"{source} was not found on the Hugging Face Hub ({type(e).__name__}); "
                              "check the repo id and revision, and the access token for private or gated repos") from None
    except Exception as e:  # network, disk, offline mode without a cached copy
        raise AdapterError(f"could not download {source} ({type(e).__name__}: {e}); check that this server "
                           "can reach the Hub, or pre-download the adapter and register its local directory") from None
    if not os.path.isfile(os.path.join(local_dir, WEIGHTS_NAME)):
        raise AdapterRejected(f"{source} has no {WEIGHTS_NAME} (a pickled adapter_model.bin is refused because "
                              "unpickling can execute code); re-save it with PeftModel.save_pretrained and push again")
    return local_dir
