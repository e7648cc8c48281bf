"""Train a LoRA adapter with transformers' Trainer and PEFT, and write PEFT's two files.

`train_lora(base_dir, data, config, out_dir)`: fp32, loss on answer tokens only (see
finetune_data), a held-out split (or the given validation data) whose loss is reported
after every epoch. Progress goes to an `on_progress(Progress)` callable: the CLI draws a
bar from it, the server's worker process turns it into job events.
"""

from __future__ import annotations

import math
import random
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

from .base_spec import ADAPTER_MODULES, LORA_MODULES
from .fused_layouts import model_targets
from .finetune_data import IGNORE, DataError, Encoded, TrainingData, encode

# Inclusive ranges of the integer hyperparameters; the HTTP API reports the same ones.
LIMITS = {"rank": (1, 256), "epochs": (1, 50), "batch_size": (1, 256), "max_seq_len": (16, 32768)}
MAX_LEARNING_RATE = 1.0
BASE_LEARNING_RATE = 2e-4       # what the API's learning_rate_multiplier multiplies


# "auto" hyperparameters (OpenAI's default for all three), from the dataset's size and length
AUTO_TARGET_EXAMPLES = (100, 25000)   # examples seen over the run: fewer epochs out of this range
AUTO_EPOCHS = (3, 1, 25)              # (default, least, most)
AUTO_BATCH_TOKENS = 8192              # tokens of one step at most, so long examples take small batches
AUTO_LR_BUDGET = 300                  # optimizer steps x learning_rate_multiplier the run aims at
AUTO_LR_MULTIPLIER = (1.0, 10.0)      # (least, most)


@dataclass(frozen=True)
class AutoHyperparameters:
    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


def auto_hyperparameters(num_examples: int, mean_tokens: float, n_epochs: int | None = None,
                         batch_size: int | None = None) -> AutoHyperparameters:
    """OpenAI's three "auto" values for a dataset of `num_examples` of `mean_tokens` each;
    an explicit `n_epochs` or `batch_size` is kept, and the others are chosen around it.

    - epochs: 3, more for small datasets so that the run sees ~100 examples, fewer for
      huge ones (at most 25000 examples seen), as OpenAI's own rule does;
    - batch size: about n/16 rounded down to a power of two (1 to 16), fewer when the
      examples are long (a step holds at most AUTO_BATCH_TOKENS tokens): a small dataset
      then still takes tens of optimizer steps, not a handful;
    - learning-rate multiplier: what brings steps x multiplier to AUTO_LR_BUDGET, from 1 to
      10. A LoRA trained for 18 steps at 2e-4 (3 epochs of 48 examples at batch 8) learns
      nothing; the same data at batch 2 and ~1e-3 learns a taught reply.
    """
    n = max(1, num_examples)
    default, least, most = AUTO_EPOCHS
    low, high = AUTO_TARGET_EXAMPLES
    epochs = default
    if n * default < low:
        epochs = min(most, -(-low // n))
    elif n * default > high:
        epochs = max(least, high // n)
    by_size = _pow2_floor(max(1, n // 16))
    by_length = _pow2_floor(max(1, int(AUTO_BATCH_TOKENS // max(1.0, mean_tokens))))
    epochs = epochs if n_epochs is None else n_epochs           # a given value is kept, even a bad one:
    batch = max(1, min(16, by_size, by_length)) if batch_size is None else batch_size   # FinetuneConfig refuses it
    steps = max(1, epochs) * -(-n // max(1, batch))
    low_mult, high_mult = AUTO_LR_MULTIPLIER
    multiplier = min(high_mult, max(low_mult, round(AUTO_LR_BUDGET / steps, 1)))
    return AutoHyperparameters(epochs, batch, multiplier)


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def mean_example_tokens(examples: list[dict]) -> float:
    """A dataset's mean length in tokens, estimated from characters (about 4 a token in
    English): cheap enough to run on every job request, before any tokenizer is loaded."""
    if not examples:
        return 0.0
    return sum(_example_chars(e) for e in examples) / len(examples) / 4


def _example_chars(example: dict) -> int:
    if "messages" in example:
        return sum(len(m.get("content") or "") if isinstance(m.get("content"), str) else 0
                   for m in example["messages"])
    return len(example.get("prompt") or "") + len(example.get("completion") or "")


class TrainingError(RuntimeError):
    """Training ran but produced nothing servable (for example, the loss diverged)."""


@dataclass
class FinetuneConfig:
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = LORA_MODULES
    use_dora: bool = False          # train DoRA (PEFT's use_dora): served unmerged, like any LoRA
    epochs: int = 3
    batch_size: int = 8
    learning_rate: float = BASE_LEARNING_RATE
    max_seq_len: int = 1024         # longer examples are cut; those left with no answer token are dropped
    eval_fraction: float = 0.1      # held out of the training data when no validation data is given
    max_eval_examples: int = 200
    seed: int = 0

    def __post_init__(self):
        self.targets = tuple(self.targets)
        for name, (low, high) in LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer from {low} to {high}, got {value!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}")
        lr = self.learning_rate
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and 0 < lr <= MAX_LEARNING_RATE):
            raise ValueError(f"learning_rate must be in (0, {MAX_LEARNING_RATE}], got {lr!r}")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"use_dora must be true or false, got {self.use_dora!r}")
        if not 0 <= self.eval_fraction <= 0.5:
            raise ValueError(f"eval_fraction must be from 0 to 0.5, got {self.eval_fraction!r}")
        unknown = [t for t in self.targets if t not in ADAPTER_MODULES]
        if not self.targets or unknown:
            raise ValueError(f"targets must be some of {', '.join(ADAPTER_MODULES)}; got {list(self.targets)}")


@dataclass
class Progress:
    step: int
    total_steps: int
    epoch: float
    train_loss: float | None        # of this step
    eval_loss: float | None         # set on the report after an evaluation
    tokens: int                     # training tokens seen so far (padding excluded)
    tokens_per_s: float
    elapsed_s: float
    eta_s: float | None


@dataclass
class TrainResult:
    out_dir: str
    steps: int
    trained_tokens: int             # tokens seen over all epochs, padding excluded (OpenAI's trained_tokens)
    train_loss: float               # mean over the run
    eval_loss: float | None         # after the last epoch; None without held-out data
    num_train: int
    num_eval: int
    seconds: float


def split_eval(examples: list, fraction: float, max_eval: int, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded random `fraction` (at least one) when there are 5 or more examples."""
    if fraction <= 0 or len(examples) < 5:
        return examples, []
    n_eval = min(max_eval, max(1, round(len(examples) * fraction)))
    held = set(random.Random(seed).sample(range(len(examples)), n_eval))
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def train_lora(base_dir: str, data: TrainingData, config: FinetuneConfig, out_dir: str,
               validation: TrainingData | None = None, on_progress: Callable[[Progress], None] | None = None,
               base_model_id: str = "") -> TrainResult:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, PrinterCallback, Trainer,
                              TrainingArguments)

    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    examples = encode(tokenizer, data, config.max_seq_len)
    if validation is not None:
        train, held = examples, encode(tokenizer, validation, config.max_seq_len)
    else:
        train, held = split_eval(examples, config.eval_fraction, config.max_eval_examples, config.seed)
    if not train:
        raise DataError(f"no example has an answer token within the first {config.max_seq_len} tokens; "
                        "shorten the prompts or raise max_seq_len")
    torch.manual_seed(config.seed)
    config_hf = AutoConfig.from_pretrained(base_dir)
    # a model converted from GGUF keeps a quantization_config, though its safetensors hold plain
    # dequantized weights; left in, it makes the Trainer refuse to train
    config_hf.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_pretrained(base_dir, config=config_hf, dtype=torch.float32)
    targets = model_targets(config_hf.model_type, config.targets)   # Phi-3: its fused qkv_proj, gate_up_proj
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules=targets, lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM", use_dora=config.use_dora)
    model = get_peft_model(model, lora)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    reporter = _make_reporter(on_progress)
    with tempfile.TemporaryDirectory(prefix="loraserve-train-") as scratch:
        args = TrainingArguments(
            output_dir=scratch, num_train_epochs=config.epochs, per_device_train_batch_size=config.batch_size,
            per_device_eval_batch_size=config.batch_size, learning_rate=config.learning_rate,
            lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, logging_strategy="steps",
            logging_steps=1, eval_strategy="epoch" if held else "no", save_strategy="no", report_to="none",
            disable_tqdm=True, seed=config.seed, data_seed=config.seed, remove_unused_columns=False,
            label_names=["labels"], prediction_loss_only=True, dataloader_pin_memory=False,
            include_num_input_tokens_seen="non_padding", use_cpu=not torch.cuda.is_available())
        trainer = Trainer(model=model, args=args, train_dataset=_Examples(train),
                          eval_dataset=_Examples(held) if held else None, data_collator=_Collate(pad_id),
                          callbacks=[reporter])
        trainer.remove_callback(PrinterCallback)   # progress goes to on_progress, not to stdout
        output = trainer.train()
        trained_tokens = int(trainer.state.num_input_tokens_seen)
    if not math.isfinite(output.training_loss):
        raise TrainingError(f"training diverged (mean loss {output.training_loss}); lower the learning rate")
    model.peft_config["default"].base_model_name_or_path = base_model_id or base_dir
    model.save_pretrained(out_dir, save_embedding_layers=False)   # LoRA only: the base's embeddings are unchanged
    return TrainResult(out_dir=out_dir, steps=output.global_step, trained_tokens=trained_tokens,
                       train_loss=float(output.training_loss), eval_loss=reporter.last_eval_loss,
                       num_train=len(train), num_eval=len(held), seconds=time.monotonic() - started)


class _Examples:
    """A map-style dataset of Encoded examples (a torch Dataset needs no more than this)."""

    def __init__(self, items: list[Encoded]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Encoded:
        return self.items[i]


class _Collate:
    """Right-pad a batch: padding is masked out of attention and out of the loss."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[Encoded]) -> dict:
        import torch

        width = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)      # [B, T]
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)       # [B, T]
        mask = torch.zeros((len(batch), width), dtype=torch.long)                # [B, T]
        for row, e in enumerate(batch):
            n = len(e.input_ids)
            ids[row, :n] = torch.tensor(e.input_ids)
            labels[row, :n] = torch.tensor(e.labels)
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _make_reporter(on_progress: Callable[[Progress], None] | None):
    """A TrainerCallback that turns the Trainer's logs (one per step, one per evaluation) into
    Progress reports; defined here so importing this module does not import the Trainer."""
    from transformers import TrainerCallback

    class Reporter(TrainerCallback):
        def __init__(self):
            self.started = time.monotonic()
            self.last_eval_loss: float | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.monotonic()

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            if "loss" not in logs and "eval_loss" not in logs:
                return      # the end-of-training summary
            if "eval_loss" in logs:
                self.last_eval_loss = float(logs["eval_loss"])
            if on_progress is None:
                return
            elapsed = max(time.monotonic() - self.started, 1e-6)
            step, total = state.global_step, state.max_steps
            tokens = int(state.num_input_tokens_seen)
            on_progress(Progress(
                step=step, total_steps=total, epoch=float(state.epoch or 0.0),
                train_loss=float(logs["loss"]) if "loss" in logs else None,
                eval_loss=float(logs["eval_loss"]) if "eval_loss" in logs else None,
                tokens=tokens, tokens_per_s=tokens / elapsed, elapsed_s=elapsed,
                eta_s=elapsed / step * (total - step) if step else None))

    return Reporter()
