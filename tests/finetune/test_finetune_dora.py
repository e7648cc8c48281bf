"""Fine-tuning trains DoRA on request (CLI --use-dora, API hyperparameters.use_dora), and
the result is served unmerged, matching HF+PEFT."""

from __future__ import annotations

import json

import torch

from loraserve.adapters.finetune import FinetuneConfig, train_lora
from loraserve.adapters.finetune_data import parse_jsonl
from loraserve.api.finetune_routes import Hyperparameters, resolve_hyperparameters

ROWS = [{"prompt": f"{i} plus {i} is", "completion": f" {2 * i}."} for i in range(8)]


def test_api_hyperparameter_use_dora_reaches_the_training_config():
    examples = ROWS
    resolved, config = resolve_hyperparameters(Hyperparameters(use_dora=True), examples, 16, 256, 0)
    assert resolved["use_dora"] is True and FinetuneConfig(**config).use_dora is True
    resolved, config = resolve_hyperparameters(Hyperparameters(), examples, 16, 256, 0)
    assert resolved["use_dora"] is False and FinetuneConfig(**config).use_dora is False


def test_trained_dora_adapter_is_served_like_peft(tiny_base, tmp_path):
    from lorakit import PeftOracle, run_and_record

    from loraserve import LLM, SamplingParams

    data = parse_jsonl("\n".join(json.dumps(r) for r in ROWS).encode())
    config = FinetuneConfig(rank=4, alpha=8.0, use_dora=True, epochs=1, batch_size=4, learning_rate=1e-2,
                            max_seq_len=32, eval_fraction=0.0)
    out = str(tmp_path / "dora")
    train_lora(tiny_base, data, config, out)
    assert json.load(open(f"{out}/adapter_config.json"))["use_dora"] is True
    llm = LLM(model=tiny_base, dtype="float32", max_loras=2, max_lora_rank=8)
    llm.add_adapter("dora", out)
    prompts = ["3 plus 3 is", "7 plus 7 is"]
    outs, logits = run_and_record(llm, prompts, ["dora", None],
                                  SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    oracle = PeftOracle(tiny_base, {"dora": out})
    for o, ours, adapter in zip(outs, logits, ["dora", None]):
        ref = oracle.logits(o.prompt_token_ids + o.token_ids, adapter)[len(o.prompt_token_ids) - 1 : -1]
        assert (ours - ref).abs().max().item() < 1e-3
        assert o.token_ids == ref.argmax(-1).tolist()
