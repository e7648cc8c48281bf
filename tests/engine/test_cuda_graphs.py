"""Decode through captured CUDA graphs gives what eager decode gives.

On CPU the Triton kernels run through the interpreter (`kernel_backend="triton"`) and a
"replay" re-runs the captured closure over the same static buffers, with the Python-side
decisions frozen at capture: everything a graph replay does but the graph itself. On a
GPU the same test captures real graphs. Both compare with eager decode and HF+PEFT."""

from __future__ import annotations

import pytest
import torch

from lorakit import ADAPTER_MIX, PeftOracle, run_and_record
from loraserve import LLM, SamplingParams
from loraserve.kernels import triton_kernels
from loraserve.model.cuda_graphs import DecodeGraphs, graph_buckets

CUDA = torch.cuda.is_available()
PROMPTS = ["In a distant galaxy, a small robot", "def fibonacci(n):", "Paris is the capital of",
           "1, 2, 3, 4,", "Water boils at"]
PARAMS = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def test_buckets_cover_every_batch_size_up_to_the_largest():
    assert graph_buckets(1) == [1]
    assert graph_buckets(6) == [1, 2, 4, 6]
    assert graph_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    buckets = graph_buckets(256)
    assert buckets[-1] == 256 and all(any(b >= n for b in buckets) for n in range(1, 257))


@pytest.fixture
def on_graph_device():
    """CUDA: real graphs. CPU: the Triton kernels through the interpreter."""
    if not CUDA:
        triton_kernels(torch.device("cpu"))           # fails here, not in an engine, without the interpreter
    return "cuda" if CUDA else "cpu"


def make_llm(base_dir, adapters, device: str, eager: bool) -> LLM:
    llm = LLM(model=base_dir, dtype="float32", device=device, max_loras=4, max_lora_rank=64,
              max_num_seqs=6, enforce_eager=eager, kernel_backend="triton")
    if device == "cpu" and not eager:                 # emulate replay: same buffers, no graph
        runner = llm.engine.runner
        runner.graphs = runner.make_decode_graphs(llm.engine.max_model_len, capture=False)
    for name, path in adapters.items():
        llm.add_adapter(name, path)
    return llm


@pytest.mark.parametrize("plan", [
    ["r4", None, "r16_rslora", "r64_qv", "r4"],    # 5 requests in bucket 6: one padding row
    [None, None, None],                            # no adapter: the graph without LoRA
], ids=["mixed_adapters", "base_only"])
def test_graph_decode_matches_eager_and_peft(tiny_models, on_graph_device, plan):
    base_dir, adapters = tiny_models["llama"]
    prompts = PROMPTS[: len(plan)]
    graphed = make_llm(base_dir, adapters, on_graph_device, eager=False)
    assert graphed.engine.runner.graphs is not None
    assert graphed.engine.runner.graphs.buckets == [1, 2, 4, 6]
    outs, logits = run_and_record(graphed, prompts, plan, PARAMS)
    eager = make_llm(base_dir, adapters, on_graph_device, eager=True)
    assert eager.engine.runner.graphs is None
    ref_outs, ref_logits = run_and_record(eager, prompts, plan, PARAMS)
    oracle = PeftOracle(base_dir, adapters)
    for out, ref_out, ours, theirs, adapter in zip(outs, ref_outs, logits, ref_logits, plan):
        assert out.token_ids == ref_out.token_ids
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
        full = out.prompt_token_ids + out.token_ids
        peft = oracle.logits(full, adapter)[len(out.prompt_token_ids) - 1 : -1]
        assert (ours - peft).abs().max().item() < 1e-3, f"adapter {adapter}"
    assert graphed.engine.stats().kv_blocks_used == 0


def test_decode_batches_over_the_largest_bucket_run_eagerly(tiny_models, on_graph_device):
    """Graphs are captured up to 256 sequences; a larger max_num_seqs decodes the rest
    eagerly. Here the largest bucket is 4 and 5 requests decode together."""
    base_dir, adapters = tiny_models["llama"]
    llm = make_llm(base_dir, adapters, on_graph_device, eager=True)
    runner = llm.engine.runner
    runner.graphs = DecodeGraphs(runner.model, 4, 8, runner.num_blocks, runner.block_size, 4, capture=CUDA)
    runner.graphs.capture_all()
    replays, eager_decodes = [], []
    runner.graphs.run = lambda step, run=runner.graphs.run: replays.append(len(step.input_ids)) or run(step)
    forward_batch = runner._forward_batch
    runner._forward_batch = lambda prefill, decode, *a: (
        eager_decodes.append(len(decode)) if not prefill else None) or forward_batch(prefill, decode, *a)
    plan = ["r4", None, "r8", "r4", None]
    outs, _ = run_and_record(llm, PROMPTS, plan, PARAMS)
    assert replays and max(replays) <= 4 and 5 in eager_decodes
    ref_outs, _ = run_and_record(make_llm(base_dir, adapters, on_graph_device, eager=True), PROMPTS, plan, PARAMS)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref_outs]
