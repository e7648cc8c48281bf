"""The one configuration object, passed down from the CLI or LLM() to every part."""

from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("auto", "float32", "bfloat16", "float16")
KERNEL_BACKENDS = ("auto", "triton", "torch")   # kernels/__init__.py select_kernels
LORA_DTYPES = ("auto", "int8")                  # adapters/slot_pool.py LoRAGroup
QUANTIZATIONS = ("none", "int8", "int4", "auto")  # model/quantize.py; auto = a GGUF file's own precision


@dataclass
class EngineConfig:
    model: str | None = None           # HF dir, .gguf file, hub id; None = embedded SmolLM2
    dtype: str = "auto"                 # auto = bfloat16 (AMX on CPU, tensor cores on GPU)
    quantization: str = "none"          # base projections: none, int8, int4 (weight-only), auto
    device: str = "auto"                # auto = cuda when available, else cpu
    seed: int = 0
    max_model_len: int | None = None    # None = min(model's context, 4096)
    block_size: int = 16                # tokens per KV block
    kv_cache_memory: int = 1 << 30      # bytes for the KV block pool
    num_kv_blocks: int | None = None    # overrides kv_cache_memory (tests force preemption)
    max_num_seqs: int = 256             # requests in one step
    max_num_batched_tokens: int = 2048  # tokens in one step; longer prompts are chunked
    max_background_tokens: int = 16     # tokens of a step for batch lines while interactive work is about; 0 = no cap
    background_hold_steps: int = 8      # steps the cap holds after the last interactive request
    enable_prefix_caching: bool = True
    max_loras: int = 8                  # adapter slots on the device
    max_lora_rank: int = 16             # slot buffers are sized to this rank
    lora_dtype: str = "auto"            # slot buffers: auto = the model dtype, int8 = codes + scales (half of bf16)
    max_module_copy_bytes: int = 1 << 30  # per adapter: modules_to_save copies (embed_tokens, lm_head) up to this
    max_cpu_loras: int | None = None    # CPU cache of loaded adapters; None = 4 * max_loras
    adapter_dir: str | None = None      # durable adapter store root; None = user cache dir
    cache_dir: str | None = None        # converted-model cache; None = user cache dir
    enforce_eager: bool = False         # CUDA: launch decode kernels one by one, no CUDA graphs
    kernel_backend: str = "auto"        # auto = Triton on CUDA, else torch; triton on CPU = the interpreter (tests)

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization {self.quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
        if self.lora_dtype not in LORA_DTYPES:
            raise ValueError(f"lora_dtype {self.lora_dtype!r} is not one of {', '.join(LORA_DTYPES)}")
        if self.kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(f"kernel_backend {self.kernel_backend!r} is not one of {', '.join(KERNEL_BACKENDS)}")
        checks = {
            "block_size": self.block_size, "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_loras": self.max_loras, "max_lora_rank": self.max_lora_rank,
        }
        for name, value in checks.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("max_background_tokens", "background_hold_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.max_cpu_loras is None:
            self.max_cpu_loras = 4 * self.max_loras
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
