"""Files, per tenant and durable: what POST /v1/files keeps for fine-tuning jobs (purpose
"fine-tune") and batches ("batch"), and the result files batches write ("batch_output").

    <root>/files/<tenant>/<file id>.jsonl    the bytes as uploaded
    <root>/files/<tenant>/<file id>.json     {id, bytes, created_at, filename, purpose, format, examples}

A file is checked line by line before anything is written (finetune_data for training
data; for a batch, that it is JSONL of objects: loraserve.batches checks each request
when the batch runs); the data is written durably before its metadata, and only a file
with metadata exists, so a crash leaves at most an orphan .jsonl, which start-up
removes. Another tenant's file is FileNotFound exactly like a missing one.

Errors are ServiceError subclasses naming the problem; api/errors.py gives each its
HTTP status and code.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from .durable import fsync_dir, write_file_atomic
from .errors import ServiceError
from .finetune_data import DataError, parse_jsonl

PURPOSE = "fine-tune"
BATCH = "batch"                 # a Batch API input file
BATCH_OUTPUT = "batch_output"   # a batch's output or error file, written by the server
UPLOAD_PURPOSES = (PURPOSE, BATCH)
MAX_BATCH_LINES = 50_000    # OpenAI's limit of requests per batch


class FileNotFound(ServiceError):
    """No such file for this tenant (another tenant's file too: no probing)."""


class WrongFilePurpose(ServiceError):
    """The file exists but was uploaded for another purpose than the one asked for."""


class InvalidPurpose(ServiceError):
    """An upload names a purpose this server keeps no files for."""


class FileTooLarge(ServiceError):
    """An upload over --max-file-bytes."""


class InvalidFile(ServiceError):
    """An upload whose lines are not what its purpose needs; the message names the first bad line."""


class BatchFileError(ValueError):
    """A batch input file that is not JSONL of request objects."""


@dataclass(frozen=True)
class StoredFile:
    id: str
    tenant: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    format: str         # finetune_data.CHAT or COMPLETION; "batch" for batch files
    examples: int       # training examples, or a batch file's lines

    def to_openai(self) -> dict:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "status_details": None, "expires_at": None}


class FileStore:
    def __init__(self, root: str, max_bytes: int):
        self.dir = os.path.join(root, "files")
        self.tmp = os.path.join(root, "tmp")
        self.max_bytes = max_bytes
        os.makedirs(self.dir, exist_ok=True)
        os.makedirs(self.tmp, exist_ok=True)
        self._lock = threading.Lock()
        self._files: dict[tuple[str, str], StoredFile] = self._scan()

    def add(self, tenant: str, filename: str, purpose: str, data: bytes) -> StoredFile:
        """Check, then store durably; InvalidPurpose, FileTooLarge or InvalidFile name the problem."""
        if purpose not in UPLOAD_PURPOSES:
            raise InvalidPurpose(f"purpose {purpose!r} is not supported; this server keeps files for fine-tuning "
                                 f"(purpose={PURPOSE!r}) and for batches (purpose={BATCH!r})", "purpose")
        if len(data) > self.max_bytes:
            raise FileTooLarge(f"the file is {len(data)} bytes; this server takes at most {self.max_bytes} "
                               "(--max-file-bytes)", "file")
        file_format, examples = _check(filename, purpose, data)
        record = StoredFile(id=f"file-{uuid.uuid4().hex[:24]}", tenant=tenant, bytes=len(data),
                            created_at=int(time.time()), filename=os.path.basename(filename) or "upload.jsonl",
                            purpose=purpose, format=file_format, examples=examples)
        self._make_folder(tenant)
        write_file_atomic(self.data_path(record), data, self.tmp)
        write_file_atomic(self._meta_path(tenant, record.id), json.dumps(asdict(record)).encode(), self.tmp)
        with self._lock:
            self._files[(tenant, record.id)] = record
        return record

    def adopt(self, tenant: str, file_id: str, filename: str, purpose: str, path: str, lines: int) -> StoredFile:
        """Take a file the server wrote (a batch's results) into the store under `file_id`,
        by rename: no copy, and it appears whole or not at all."""
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        record = StoredFile(id=file_id, tenant=tenant, bytes=os.path.getsize(path), created_at=int(time.time()),
                            filename=filename, purpose=purpose, format=BATCH, examples=lines)
        self._make_folder(tenant)
        os.replace(path, self.data_path(record))
        write_file_atomic(self._meta_path(tenant, record.id), json.dumps(asdict(record)).encode(), self.tmp)
        with self._lock:
            self._files[(tenant, record.id)] = record
        return record

    def exists(self, tenant: str, file_id: str) -> bool:
        with self._lock:
            return (tenant, file_id) in self._files

    def get(self, tenant: str, file_id: str, param: str = "file_id", purpose: str | None = None) -> StoredFile:
        """The tenant's file (else FileNotFound); with `purpose`, WrongFilePurpose when the
        file was uploaded for another."""
        with self._lock:
            record = self._files.get((tenant, file_id))
        if record is None:
            raise FileNotFound(f"no file {file_id!r} for this tenant; GET /v1/files lists yours", param)
        if purpose is not None and record.purpose != purpose:
            raise WrongFilePurpose(f"file {file_id!r} was uploaded with purpose {record.purpose!r}; this needs a "
                                   f"file uploaded with purpose {purpose!r}", param)
        return record

    def list(self, tenant: str, purpose: str | None = None) -> list[StoredFile]:
        """Newest first."""
        with self._lock:
            mine = [f for (t, _), f in self._files.items() if t == tenant and purpose in (None, f.purpose)]
        return sorted(mine, key=lambda f: f.created_at, reverse=True)

    def delete(self, tenant: str, file_id: str) -> StoredFile:
        record = self.get(tenant, file_id)
        with self._lock:
            self._files.pop((tenant, file_id), None)
        os.remove(self._meta_path(tenant, file_id))     # gone from the listing first, then the data
        _remove(self.data_path(record))
        fsync_dir(os.path.join(self.dir, tenant))
        return record

    def read(self, record: StoredFile) -> bytes:
        with open(self.data_path(record), "rb") as f:
            return f.read()

    def _make_folder(self, tenant: str) -> None:
        folder = os.path.join(self.dir, tenant)
        if not os.path.isdir(folder):
            os.makedirs(folder, exist_ok=True)
            fsync_dir(self.dir)

    def data_path(self, record: StoredFile) -> str:
        return os.path.join(self.dir, record.tenant, f"{record.id}.jsonl")

    def _meta_path(self, tenant: str, file_id: str) -> str:
        return os.path.join(self.dir, tenant, f"{file_id}.json")

    def _scan(self) -> dict[tuple[str, str], StoredFile]:
        found = {}
        for tenant in sorted(os.listdir(self.dir)):
            folder = os.path.join(self.dir, tenant)
            names = set(os.listdir(folder))
            for name in names:
                stem, ext = os.path.splitext(name)
                if ext == ".jsonl" and f"{stem}.json" not in names:
                    _remove(os.path.join(folder, name))      # a crash between data and metadata
                elif ext == ".json":
                    with open(os.path.join(folder, name), "rb") as f:
                        record = StoredFile(**json.loads(f.read()))
                    found[(tenant, record.id)] = record
        return found


def _check(filename: str, purpose: str, data: bytes) -> tuple[str, int]:
    """(format, examples) of an upload; InvalidFile naming the first bad line."""
    try:
        if purpose == BATCH:
            return BATCH, len(parse_objects(data))
        parsed = parse_jsonl(data)
        return parsed.format, len(parsed.examples)
    except (DataError, BatchFileError) as e:
        kind = "batch" if purpose == BATCH else "training"
        raise InvalidFile(f"invalid {kind} file {filename!r}: {e}", "file") from None


def parse_objects(data: bytes) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a batch file; BatchFileError
    naming the first line that is not a JSON object."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BatchFileError(f"the file is not UTF-8 text ({e})") from None
    out = []
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as e:
            raise BatchFileError(f"line {number} is not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(value, dict):
            raise BatchFileError(f"line {number} is a JSON {type(value).__name__}, not an object")
        out.append((number, value))
    if not out:
        raise BatchFileError("the file has no requests; write one JSON object per line")
    if len(out) > MAX_BATCH_LINES:
        raise BatchFileError(f"the file has {len(out)} requests; a batch takes at most {MAX_BATCH_LINES}")
    return out


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
