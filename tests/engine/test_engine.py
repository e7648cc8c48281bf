"""Engine behaviour on a tiny random model: bad input, leaks, seeds, stops, async."""

from __future__ import annotations

import asyncio
import json
import os
import shutil

import pytest
import torch

from loraserve import LLM, SamplingParams
from loraserve.adapters import AdapterNotFound, AdapterRejected
from loraserve.async_engine import AsyncEngine

GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tiny_models):
    base_dir, adapters = tiny_models["llama"]
    llm = LLM(model=base_dir, dtype="float32", max_loras=2, max_lora_rank=64, max_model_len=256)
    for name, path in adapters.items():
        llm.add_adapter(name, path)
    return llm, adapters


def assert_idle(llm: LLM):
    stats = llm.engine.stats()
    assert stats.kv_blocks_used == 0, "KV blocks leaked"
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert not llm.engine.slots.pins, "adapter pins leaked"


def test_outputs_in_input_order_with_fields(tiny):
    llm, _ = tiny
    prompts = ["one two three", "a", "the cat sat on the mat and then"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=2),
                        adapters=["r4", None, "r64_qv"], use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == [llm.tokenizer.encode(p) for p in prompts]
    for o in outs:
        assert len(o.token_ids) == 5 and o.finish_reason == "length"
        assert len(o.logprobs) == 5 and len(o.logprobs[0].top) == 2
        assert o.text == llm.tokenizer.decode(o.token_ids, skip_special_tokens=True)
    assert_idle(llm)


def test_more_adapters_than_slots_rotate_through(tiny):
    llm, adapters = tiny
    names = list(adapters)                                  # 4 adapters, 2 slots
    outs = llm.generate(["hello"] * 8, GREEDY, adapters=names * 2, use_tqdm=False)
    assert all(len(o.token_ids) == 8 for o in outs)
    for i in range(4):                                      # same adapter, same prompt, same output
        assert outs[i].token_ids == outs[i + 4].token_ids
    assert llm.engine.stats().adapter_evictions > 0
    assert_idle(llm)


def test_same_seed_same_output(tiny):
    llm, _ = tiny
    p = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
    a = llm.generate(["once upon"], p, use_tqdm=False)[0]
    b = llm.generate(["once upon", "noise", "more noise"], [p, GREEDY, SamplingParams(max_tokens=4, temperature=1.0)],
                     use_tqdm=False)[0]
    assert a.token_ids == b.token_ids
    c = llm.generate(["once upon"], SamplingParams(max_tokens=12, temperature=1.0, seed=99, ignore_eos=True),
                     use_tqdm=False)[0]
    assert c.token_ids != a.token_ids


def test_stop_token_ids_and_min_tokens(tiny):
    llm, _ = tiny
    free = llm.generate(["stop test"], GREEDY, use_tqdm=False)[0]
    stop_at = free.token_ids[3]
    first = free.token_ids.index(stop_at)
    out = llm.generate(["stop test"], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[stop_at]),
                       use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[: first + 1]
    assert out.stop_reason == stop_at
    held = llm.generate(["stop test"], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[stop_at],
                                                      min_tokens=first + 2), use_tqdm=False)[0]
    assert len(held.token_ids) >= first + 2


def test_stop_string_cuts_text(tiny):
    llm, _ = tiny
    free = llm.generate(["stop string"], GREEDY, use_tqdm=False)[0]
    assert len(free.text) > 4
    stop = free.text[2:4]
    out = llm.generate(["stop string"], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == free.text[: free.text.index(stop)]


def test_chat_applies_the_template(tiny):
    llm, _ = tiny
    messages = [{"role": "user", "content": "hi"}]
    out = llm.chat([messages], GREEDY, use_tqdm=False)[0]
    text = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert out.prompt_token_ids == llm.tokenizer.encode(text, add_special_tokens=False)


def test_length_limit_at_context_window(tiny):
    llm, _ = tiny
    prompt = list(range(1000, 1000 + 250))
    out = llm.generate([prompt], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    assert out.finish_reason == "length" and len(prompt) + len(out.token_ids) == 256


# -- bad input: a clear exception, nothing held, the engine keeps serving -------------------

@pytest.mark.parametrize("make_call, error, message", [
    (lambda llm: llm.generate(["x"], GREEDY, adapters=["nope"]), AdapterNotFound, "nope"),
    (lambda llm: llm.generate([list(range(300))], GREEDY), ValueError, "maximum context length is 256"),
    (lambda llm: llm.generate([""], GREEDY), ValueError, "empty"),
    (lambda llm: llm.generate([[10**9]], GREEDY), ValueError, "token ids"),
    (lambda llm: llm.generate(["x", "y"], GREEDY, adapters=["r4"]), ValueError, "entries"),
    (lambda llm: llm.generate(["x"], SamplingParams(max_tokens=0)), ValueError, "max_tokens"),
])
def test_bad_requests_raise_and_leave_no_trace(tiny, make_call, error, message):
    llm, _ = tiny
    llm.engine.add_request("keep serving", GREEDY, "r4", request_id="bystander")
    with pytest.raises(error, match=message):
        make_call(llm)
    assert list(llm.engine.requests) == ["bystander"]
    while llm.engine.has_unfinished():
        llm.engine.step()
    assert_idle(llm)


def test_bad_adapters_are_refused_by_name(tiny, tmp_path):
    llm, adapters = tiny
    pickle_only = tmp_path / "pickle"
    pickle_only.mkdir()
    shutil.copy(os.path.join(adapters["r4"], "adapter_config.json"), pickle_only)
    torch.save({}, pickle_only / "adapter_model.bin")
    with pytest.raises(AdapterRejected, match="pickle"):
        llm.add_adapter("evil", str(pickle_only))

    too_big = tmp_path / "big"
    shutil.copytree(adapters["r64_qv"], too_big)
    small = LLM(model=llm.engine.config.model, dtype="float32", max_lora_rank=16)
    with pytest.raises(AdapterRejected, match="max_lora_rank|max-lora-rank"):
        small.add_adapter("big", str(too_big))

    qwen_shaped = tmp_path / "shape"
    shutil.copytree(adapters["r4"], qwen_shaped)
    from safetensors.torch import load_file, save_file
    tensors = load_file(qwen_shaped / "adapter_model.safetensors")
    key = next(k for k in tensors if "q_proj.lora_A" in k)
    tensors[key] = torch.zeros(4, 99)
    save_file(tensors, qwen_shaped / "adapter_model.safetensors")
    with pytest.raises(AdapterRejected, match="shape|99"):
        llm.add_adapter("bad_shape", str(qwen_shaped))

    dora = tmp_path / "dora"
    shutil.copytree(adapters["r4"], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterRejected, match="DoRA|dora"):
        llm.add_adapter("dora", str(dora))
    for name in ("evil", "big", "bad_shape", "dora"):
        with pytest.raises(AdapterNotFound):                # nothing was stored
            llm.engine.store.resolve("default", name)


def test_abort_frees_everything(tiny):
    llm, _ = tiny
    engine = llm.engine
    ids = [engine.add_request("abort me " * 3, SamplingParams(max_tokens=50, ignore_eos=True), a)
           for a in ["r4", "r8", None]]
    engine.step()
    engine.step()
    for rid in ids:
        assert engine.abort(rid).finish_reason == "abort"
    assert engine.abort("unknown") is None
    assert_idle(llm)


def test_hot_swap_keeps_running_requests_on_old_weights(tiny, tmp_path):
    llm, adapters = tiny
    engine = llm.engine
    llm.add_adapter("swap", adapters["r4"])
    before = llm.generate(["swap test"], GREEDY, adapters="swap", use_tqdm=False)[0].token_ids
    rid = engine.add_request("swap test", GREEDY, "swap")
    engine.step()
    llm.add_adapter("swap", adapters["r8"])                 # new weights under the same name
    old_run = None
    while engine.has_unfinished():
        for out in engine.step().outputs:
            if out.request_id == rid and out.finished:
                old_run = out.token_ids
    assert old_run == before
    after = llm.generate(["swap test"], GREEDY, adapters="swap", use_tqdm=False)[0].token_ids
    expected = llm.generate(["swap test"], GREEDY, adapters="r8", use_tqdm=False)[0].token_ids
    assert after == expected
    llm.remove_adapter("swap")
    assert_idle(llm)


def test_async_engine_streams_and_aborts(tiny):
    llm, _ = tiny
    engine = AsyncEngine(engine=llm.engine)

    async def main():
        deltas = []
        async for out in engine.generate("stream me", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), "r8"):
            deltas.append(out.delta_token_ids)
        gen = engine.generate("abort me", SamplingParams(max_tokens=200, ignore_eos=True))
        await gen.__anext__()
        await gen.aclose()                                  # the caller went away
        with pytest.raises(AdapterNotFound):
            async for _ in engine.generate("x", GREEDY, "missing"):
                pass
        stats = await engine.call(lambda e: e.stats())
        for _ in range(200):                                # the abort lands on the engine thread, bounded
            if stats.num_running == 0:
                break
            await asyncio.sleep(0.05)
            stats = await engine.call(lambda e: e.stats())
        return deltas, stats

    try:
        deltas, stats = asyncio.run(main())
    finally:
        engine.shutdown()
    assert sum(len(d) for d in deltas) == 6 and all(len(d) == 1 for d in deltas)
    assert stats.kv_blocks_used == 0 and stats.num_running == 0
    sync = llm.generate(["stream me"], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                        adapters="r8", use_tqdm=False)[0]
    assert [t for d in deltas for t in d] == sync.token_ids


def test_a_failing_request_fails_alone(tiny, monkeypatch):
    """An exception while post-processing one request ends that request with an error;
    the others finish normally and nothing leaks."""
    llm, _ = tiny
    engine = llm.engine
    victim = engine.add_request("victim", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    others = [engine.add_request(f"other {i}", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), a)
              for i, a in enumerate(["r4", None])]
    def explode(seq, token_id):
        if seq.state.output.request_id == victim and len(seq.output_token_ids) == 2:
            raise RuntimeError("boom")

    monkeypatch.setattr(engine.hooks, "on_token", explode)
    final = {}
    while engine.has_unfinished():
        for out in engine.step().outputs:
            if out.finished:
                final[out.request_id] = out
    assert final[victim].finish_reason == "error" and "boom" in final[victim].error
    assert all(final[r].finish_reason == "length" for r in others)
    assert_idle(llm)


def test_a_failing_forward_pass_fails_its_batch_only(tiny, monkeypatch):
    llm, _ = tiny
    engine = llm.engine
    first = engine.add_request("first", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    real_run = engine.runner.run
    monkeypatch.setattr(engine.runner, "run", lambda inputs: (_ for _ in ()).throw(RuntimeError("kernel fault")))
    outs = engine.step().outputs
    assert [o.finish_reason for o in outs] == ["error"] and outs[0].request_id == first
    monkeypatch.setattr(engine.runner, "run", real_run)
    later = llm.generate(["later"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    assert later.finish_reason == "length"
    assert_idle(llm)
