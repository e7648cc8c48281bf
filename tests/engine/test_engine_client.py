"""The engine's interface to the HTTP layer: EngineClient's members exist on both
implementations, `prepare` checks once and fixes the adapter version, and EngineStats
sums replicas the way a Ray ingress reports them."""

from __future__ import annotations

import asyncio

import pytest

from loraserve import LLM, SamplingParams
from loraserve.async_engine import AsyncEngine
from loraserve.engine_client import EngineClient, ReplicaEngineClient
from loraserve.engine_stats import EngineStats
from loraserve.prepared import ContextLengthExceeded, PromptError

GREEDY = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)


def protocol_members(protocol) -> set[str]:
    names = set()
    for cls in protocol.__mro__:
        if cls in (object,) or cls.__name__ == "Protocol" or cls.__name__ == "Generic":
            continue
        names |= {n for n in vars(cls) if not n.startswith("_")} | set(getattr(cls, "__annotations__", {}))
    return names


@pytest.fixture(scope="module")
def tiny(tiny_models):
    base_dir, adapters = tiny_models["llama"]
    llm = LLM(model=base_dir, dtype="float32", max_loras=2, max_lora_rank=64, max_model_len=64)
    return llm, adapters


def test_both_engines_have_every_member_of_the_protocol(tiny):
    llm, _ = tiny
    engine = AsyncEngine(engine=llm.engine)
    try:
        missing = [n for n in protocol_members(ReplicaEngineClient) if not hasattr(engine, n)]
        assert not missing, f"AsyncEngine lacks {missing}"
    finally:
        engine.shutdown()
    pytest.importorskip("ray")
    from loraserve.api.ray_ingress import ClusterEngine

    members = set(dir(ClusterEngine)) | {"model_id", "model_dir", "tokenizer", "vocab_size", "config", "store",
                                         "error"}   # set in __init__
    assert not [n for n in protocol_members(EngineClient) if n not in members]


def test_prepare_fixes_the_version_and_add_request_trusts_it(tiny):
    llm, adapters = tiny
    first = llm.add_adapter("bot", adapters["r4"])
    prepared = llm.engine.prepare("hello there", "bot")
    second = llm.add_adapter("bot", adapters["r8"])           # a newer version lands in between
    assert prepared.adapter == first and second.version == first.version + 1
    rid = llm.engine.add_request(prepared, GREEDY)
    assert llm.engine.requests[rid].adapter_key == first.key
    while llm.engine.has_unfinished():
        llm.engine.step()
    assert llm.engine.prepare("hello there", "bot").adapter == second


@pytest.mark.parametrize("prompt, error, words", [
    ([], PromptError, "empty"),
    ([1, -1], PromptError, "token ids"),
    (list(range(64)), ContextLengthExceeded, "maximum context length is 64"),
])
def test_prepare_refuses_bad_prompts_naming_the_problem(tiny, prompt, error, words):
    llm, _ = tiny
    with pytest.raises(error, match=words):
        llm.engine.prepare(prompt)


def test_the_vocabulary_bound_is_the_smaller_of_tokenizer_and_embedding(tiny):
    llm, _ = tiny
    engine = llm.engine
    assert engine.vocab_bound == min(len(engine.tokenizer), engine.hf_config.vocab_size)
    with pytest.raises(PromptError, match="token ids"):
        engine.prepare([engine.vocab_bound])
    assert engine.prepare([engine.vocab_bound - 1]).prompt_ids == [engine.vocab_bound - 1]


def test_async_engine_answers_stats_and_tiers_on_its_thread(tiny):
    llm, adapters = tiny
    record = llm.add_adapter("tiered", adapters["r4"])
    engine = AsyncEngine(engine=llm.engine)

    async def main():
        async for _ in engine.generate(engine.prepare("hi", record), GREEDY):
            pass
        return await engine.stats(), await engine.adapter_tiers([record])
    try:
        stats, tiers = asyncio.run(main())
    finally:
        engine.shutdown()
    assert isinstance(stats, EngineStats) and stats.kv_blocks_used == 0
    assert tiers == [stats.tier_of(record.key)] and tiers[0] in ("device", "cpu")


def test_stats_of_replicas_sum_and_their_residency_is_the_union():
    a = EngineStats(num_running=2, disk_loads=1, disk_load_seconds=0.5, resident={"device": ["t/x@1"], "cpu": []})
    b = EngineStats(num_running=3, disk_loads=2, disk_load_seconds=0.25,
                    resident={"device": ["t/y@1"], "cpu": ["t/x@1"]})
    total = EngineStats.total([a, b])
    assert total.num_running == 5 and total.disk_loads == 3 and total.disk_load_seconds == 0.75
    assert total.resident == {"device": ["t/x@1", "t/y@1"], "cpu": ["t/x@1"]}
    assert total.tier_of("t/x@1") == "device" and total.tier_of("t/z@1") == "disk"
    assert EngineStats.total([]) == EngineStats(resident={"device": [], "cpu": []})
