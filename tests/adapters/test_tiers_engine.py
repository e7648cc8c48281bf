"""The engine with its adapter tiers, on a tiny random llama: background loads, fair rotation,
versions, tenants."""

from __future__ import annotations

import threading

import pytest

from loraserve import LLM, SamplingParams
from loraserve.adapters import AdapterNotFound

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def make_llm(tiny_models, tmp_path, **kw) -> tuple[LLM, dict]:
    base_dir, adapters = tiny_models["llama"]
    llm = LLM(model=base_dir, dtype="float32", max_lora_rank=64, adapter_dir=str(tmp_path / "store"), **kw)
    return llm, adapters


def drain(engine, until=None, max_steps=2000):
    outs = {}
    for _ in range(max_steps):
        if not engine.has_unfinished() or (until and until(outs)):
            break
        for out in engine.step().outputs:
            outs.setdefault(out.request_id, []).append(out)
    return outs


def test_slow_adapter_load_does_not_stall_other_requests(tiny_models, tmp_path):
    llm, adapters = make_llm(tiny_models, tmp_path, max_loras=2)
    engine = llm.engine
    llm.add_adapter("slow", adapters["r8"])
    llm.add_adapter("fast", adapters["r4"])
    gate = threading.Event()
    engine.hooks.before_adapter_load = lambda rec: gate.wait(30) if rec.name == "slow" else None
    slow = engine.add_request("slow one", GREEDY, "slow")
    fast = engine.add_request("fast one", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True), "fast")
    outs = drain(engine, until=lambda o: any(x.finished for x in o.get(fast, [])))
    assert outs[fast][-1].finished and len(outs[fast][-1].token_ids) == 20    # ran to the end
    assert slow not in outs                            # still waiting on its load
    gate.set()
    outs = drain(engine)
    assert outs[slow][-1].finish_reason == "length"
    assert engine.stats().kv_blocks_used == 0


def test_three_times_more_adapters_than_slots_all_served_with_bounded_wait(tiny_models, tmp_path):
    llm, adapters = make_llm(tiny_models, tmp_path, max_loras=2, max_cpu_loras=3)
    engine = llm.engine
    paths = list(adapters.values())
    names = [f"a{i}" for i in range(6)]
    for i, name in enumerate(names):
        llm.add_adapter(name, paths[i % len(paths)])
    ids = [engine.add_request(f"request {i}", GREEDY, names[i % 6]) for i in range(24)]
    first_token_step, step = {}, 0
    while engine.has_unfinished():
        step += 1
        for out in engine.step().outputs:
            first_token_step.setdefault(out.request_id, step)
        assert step < 500
    assert set(first_token_step) == set(ids)
    # 24 requests of 6 tokens through 2 slots: nobody waits for more than a few rounds
    assert max(first_token_step.values()) <= 6 * 7
    stats = engine.stats()
    assert stats.adapter_evictions > 0 and stats.disk_loads >= 6
    assert stats.kv_blocks_used == 0 and not engine.slots.pins


def test_versions_hot_swap_and_prefix_cache_isolation(tiny_models, tmp_path):
    llm, adapters = make_llm(tiny_models, tmp_path, max_loras=2, block_size=4)
    engine = llm.engine
    v1 = llm.add_adapter("bot", adapters["r4"])
    ref1 = llm.generate(["hot swap prompt here"], GREEDY, adapters="bot", use_tqdm=False)[0].token_ids
    running = engine.add_request("hot swap prompt here", GREEDY, "bot")
    engine.step()
    v2 = llm.add_adapter("bot", adapters["r8"])       # alias moves to version 2
    assert (v1.version, v2.version) == (1, 2) and v1.key != v2.key
    outs = drain(engine)
    assert outs[running][-1].token_ids == ref1       # finished on the version it started with
    new = llm.generate(["hot swap prompt here"], GREEDY, adapters="bot", use_tqdm=False)[0]
    assert new.num_cached_tokens == 0                 # no KV computed with v1 weights is reused
    ref_r8 = llm.generate(["hot swap prompt here"], GREEDY, adapters="bot@2", use_tqdm=False)[0]
    assert new.token_ids == ref_r8.token_ids
    assert llm.generate(["hot swap prompt here"], GREEDY, adapters="bot@1", use_tqdm=False)[0].token_ids == ref1


def test_delete_while_running_finishes_then_goes(tiny_models, tmp_path):
    llm, adapters = make_llm(tiny_models, tmp_path, max_loras=2)
    engine = llm.engine
    llm.add_adapter("temp", adapters["r4"])
    rid = engine.add_request("delete me", SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), "temp")
    engine.step()
    llm.remove_adapter("temp")
    outs = drain(engine)
    assert outs[rid][-1].finish_reason == "length"
    with pytest.raises(AdapterNotFound):
        engine.add_request("again", GREEDY, "temp")
    assert engine.stats().adapter_slots_used <= 1 and not engine.slots.pins


def test_tenants_see_only_their_own_and_shared_adapters(tiny_models, tmp_path):
    llm, adapters = make_llm(tiny_models, tmp_path, max_loras=2)
    engine = llm.engine
    engine.store.register_dir("acme", "bot", adapters["r4"])
    engine.store.register_dir("globex", "bot", adapters["r8"])
    engine.store.register_dir("acme", "public", adapters["r16_rslora"], shared=True)
    acme = engine.add_request("tenant", GREEDY, "bot", tenant="acme")
    globex = engine.add_request("tenant", GREEDY, "bot", tenant="globex")
    outs = drain(engine)
    assert outs[acme][-1].token_ids != outs[globex][-1].token_ids       # different adapters
    engine.add_request("tenant", GREEDY, "public", tenant="globex")    # shared: visible
    with pytest.raises(AdapterNotFound) as missing:
        engine.add_request("tenant", GREEDY, "nothing-here", tenant="globex")
    with pytest.raises(AdapterNotFound) as foreign:
        engine.add_request("tenant", GREEDY, "secret", tenant="globex")
    engine.store.register_dir("acme", "secret", adapters["r4"])
    with pytest.raises(AdapterNotFound) as hidden:
        engine.add_request("tenant", GREEDY, "secret", tenant="globex")
    assert str(hidden.value).replace("secret", "X") == str(foreign.value).replace("secret", "X")
    drain(engine)


def test_unloadable_adapter_fails_its_request_only(tiny_models, tmp_path):
    llm, adapters = make_llm(tiny_models, tmp_path, max_loras=2)
    engine = llm.engine
    llm.add_adapter("broken", adapters["r4"])
    llm.add_adapter("fine", adapters["r8"])

    def corrupt(rec):
        if rec.name == "broken":
            raise OSError("disk error")
    engine.hooks.before_adapter_load = corrupt
    bad = engine.add_request("x", GREEDY, "broken")
    good = engine.add_request("y", GREEDY, "fine")
    outs = drain(engine)
    assert outs[bad][-1].finish_reason == "error" and "disk error" in outs[bad][-1].error
    assert outs[good][-1].finish_reason == "length"
    assert engine.stats().kv_blocks_used == 0
