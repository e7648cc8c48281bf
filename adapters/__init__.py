"""Everything about LoRA adapters: PEFT format and validation, and the durable store."""

from .base_spec import LORA_MODULES, BaseModelSpec
from .errors import AdapterConflict, AdapterError, AdapterNotFound, AdapterRejected
from .names import check_name, parse_ref
from .peft_format import LoRAAdapter, load_peft_bytes, load_peft_dir, write_peft_files
from .record import AdapterRecord
from .store import AdapterStore
from .store_layout import default_store_root
from .cpu_tier import CpuTier
from .device_slots import DeviceSlots, Pin
from .registry import AdapterRegistry

__all__ = [
    "LORA_MODULES", "BaseModelSpec",
    "AdapterError", "AdapterRejected", "AdapterNotFound", "AdapterConflict",
    "check_name", "parse_ref",
    "LoRAAdapter", "load_peft_dir", "load_peft_bytes", "write_peft_files",
    "AdapterRecord", "AdapterStore", "default_store_root",
    "CpuTier", "DeviceSlots", "Pin", "AdapterRegistry",
]
