"""Everything about LoRA adapters: PEFT format and validation, and the durable store."""

from .base_spec import LORA_MODULES, BaseModelSpec
from .errors import AdapterConflict, AdapterError, AdapterNotFound, AdapterRejected, ServiceError
from .names import DEFAULT_TENANT, check_name, parse_ref
from .peft_format import LoRAAdapter, load_peft_bytes, load_peft_dir, write_peft_files
from .record import AdapterRecord
from .store import AdapterStore
from .store_layout import default_store_root
from .cpu_tier import CpuTier
from .pin import Pin
from .slot_pool import LoRAGroup, SlotPool
from .registry import AdapterRegistry

__all__ = [
    "LORA_MODULES", "BaseModelSpec",
    "AdapterError", "AdapterRejected", "AdapterNotFound", "AdapterConflict", "ServiceError",
    "DEFAULT_TENANT", "check_name", "parse_ref",
    "LoRAAdapter", "load_peft_dir", "load_peft_bytes", "write_peft_files",
    "AdapterRecord", "AdapterStore", "default_store_root",
    "CpuTier", "SlotPool", "LoRAGroup", "Pin", "AdapterRegistry",
]
