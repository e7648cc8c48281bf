"""Triton SGMV/BGMV kernels against the fp32 loop oracle `add_lora_ref`.

Grid axes: dtype x rank x hidden x adapter popularity x token count x fused projections.
The interpreter runs a pairwise covering subset (every pair of axis values appears in
some case); the full cross product (less a few cases with adapters over ~240 MB) runs on
a GPU (`-m gpu`).
"""

import itertools
import random

import pytest
import torch

pytest.importorskip("triton")

from lorakit import random_lora_slots  # noqa: E402

from loraserve.kernels import build_lora_meta, select_kernels  # noqa: E402
from loraserve.kernels import sgmv  # noqa: E402
from loraserve.kernels.lora_meta import LoRABlocks, LoRAMetaBuffers  # noqa: E402
from loraserve.kernels.sgmv import (  # noqa: E402
    add_lora_bgmv, add_lora_ref, add_lora_sgmv, add_lora_triton, bgmv_shrink, sgmv_shrink, slot_a,
)

AXES = {
    "dtype": [torch.float32, torch.bfloat16, torch.float16],
    "rank": [1, 8, 16, 64, "mixed"],
    "hidden": [64, 576, 4096],
    "popularity": ["distinct", "uniform", "zipf", "identical", "skewed", "none"],
    "num_tokens": [1, 7, 33, 133],
    "n_proj": [1, 2, 3],
}
TOL = {  # (atol, rtol) of the output against the fp32 oracle: final rounding + on GPU, v rounded to the dot dtype
    torch.float32: (1e-4, 1e-4),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 2e-2),
}
MIXED_RANKS = [8, 64, 1, 16]
MAX_WEIGHT_ELEMENTS = 6_000_000  # keeps one case's adapters under ~25 MB on CPU


NUM_SLOTS = {"uniform": 8, "zipf": 16, "identical": 4, "skewed": 8, "none": 4}  # "distinct": one per token


def _num_slots(popularity: str, num_tokens: int) -> int:
    return num_tokens if popularity == "distinct" else NUM_SLOTS[popularity]


def _weight_elements(case: dict) -> int:
    r_max = 64 if case["rank"] == "mixed" else case["rank"]
    h = case["hidden"]
    per_slot = r_max * (h * case["n_proj"] + sum(_out_sizes(h, case["n_proj"])))   # A and Bs
    return _num_slots(case["popularity"], case["num_tokens"]) * per_slot


def covering_cases(axes: dict, feasible, seed: int = 0) -> list[dict]:
    """Greedy pairwise covering array: add the random candidate that covers the most
    still-uncovered value pairs until every feasible pair is covered."""
    rng = random.Random(seed)
    names = list(axes)
    uncovered = {((a, i), (b, j)) for a, b in itertools.combinations(names, 2)
                 for i in range(len(axes[a])) for j in range(len(axes[b]))}
    cases = []
    for _ in range(200):
        candidates = [{n: rng.randrange(len(axes[n])) for n in names} for _ in range(60)]
        candidates = [c for c in candidates if feasible({n: axes[n][i] for n, i in c.items()})]
        pairs = [{((a, c[a]), (b, c[b])) for a, b in itertools.combinations(names, 2)} & uncovered
                 for c in candidates]
        if not candidates or not max(map(len, pairs)):
            continue
        best = max(range(len(candidates)), key=lambda k: len(pairs[k]))
        uncovered -= pairs[best]
        cases.append({n: axes[n][i] for n, i in candidates[best].items()})
        if not uncovered:
            break
    return cases


def _case_id(c: dict) -> str:
    dt = str(c["dtype"]).removeprefix("torch.")
    return f"{dt}-r{c['rank']}-h{c['hidden']}-{c['popularity']}-T{c['num_tokens']}-p{c['n_proj']}"


def _out_sizes(hidden: int, n_proj: int) -> list[int]:
    """o_proj-like, gate_up-like (odd sizes), qkv-like (q wide, k and v narrow)."""
    return {1: [hidden], 2: [hidden // 2 + 3] * 2, 3: [hidden, hidden // 4 + 1, hidden // 4 + 1]}[n_proj]


CASES = covering_cases(AXES, lambda c: _weight_elements(c) <= MAX_WEIGHT_ELEMENTS)


def _token_slots(popularity: str, num_tokens: int, num_slots: int, rng: random.Random) -> list[int]:
    """Each token's slot; uniform, zipf and skewed also mix in tokens with no adapter."""
    def maybe_none(s):
        return -1 if rng.random() < 0.2 else s
    if popularity == "distinct":
        slots = list(range(num_slots))
        rng.shuffle(slots)
        return slots[:num_tokens]
    if popularity == "uniform":
        return [maybe_none(rng.randrange(num_slots)) for _ in range(num_tokens)]
    if popularity == "zipf":
        weights = [1 / (k + 1) ** 1.2 for k in range(num_slots)]
        return [maybe_none(s) for s in rng.choices(range(num_slots), weights, k=num_tokens)]
    if popularity == "identical":
        return [2] * num_tokens
    if popularity == "skewed":
        return [maybe_none(5 if rng.random() < 0.9 else rng.randrange(num_slots)) for _ in range(num_tokens)]
    return [-1] * num_tokens                                     # "none"


def make_problem(case: dict, device: str, seed: int = 0):
    """Random adapters whose padding beyond each slot's rank is NaN: a kernel that reads
    past the rank (or pads to r_max) poisons the output."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    T, h, n_proj, dtype = case["num_tokens"], case["hidden"], case["n_proj"], case["dtype"]
    num_slots = _num_slots(case["popularity"], T)
    ranks = [MIXED_RANKS[s % 4] if case["rank"] == "mixed" else case["rank"] for s in range(num_slots)]
    outs = _out_sizes(h, n_proj)
    A, Bs = random_lora_slots(ranks, h, outs, gen, pad=float("nan"))
    x = torch.randn(T, h, generator=gen)
    N = sum(outs)
    fused = torch.randn(T, N + 7, generator=gen)                # y is a column view of a wider output
    out_slices = [(sum(outs[:p]), o) for p, o in enumerate(outs)]
    slots = _token_slots(case["popularity"], T, num_slots, rng)
    to = dict(device=device, dtype=dtype)
    meta = build_lora_meta(slots, ranks, device=device)
    return fused.to(**to), x.to(**to), A.to(**to), [B.to(**to) for B in Bs], out_slices, meta


def view(impl, meta):
    """The metadata in the form `impl` reads: SGMV reads token blocks, BGMV the core."""
    return meta if impl in (add_lora_bgmv, bgmv_shrink) else LoRABlocks.of(meta)


def check_add_lora(impls, case: dict, device: str) -> None:
    """Each implementation against the oracle, computed once (the oracle's token loop is
    most of the GPU grid's time)."""
    before, x, A, Bs, out_slices, meta = make_problem(case, device)
    N = sum(size for _, size in out_slices)
    expected = add_lora_ref(before[:, 3 : 3 + N].float().cpu().clone(), x.float().cpu(), A.float().cpu(),
                            [B.float().cpu() for B in Bs], out_slices, meta_to_cpu(meta))
    untouched = (meta.token_slots < 0).cpu()
    for impl in impls:
        fused = before.clone()
        y = fused[:, 3 : 3 + N]
        out = impl(y, x, A, Bs, out_slices, view(impl, meta))
        assert out.data_ptr() == y.data_ptr()
        atol, rtol = TOL[case["dtype"]]
        torch.testing.assert_close(out.float().cpu(), expected, atol=atol, rtol=rtol)
        # columns outside y and rows of tokens without an adapter are untouched, bit for bit
        assert torch.equal(fused[:, :3].cpu(), before[:, :3].cpu())
        assert torch.equal(fused[:, 3 + N :].cpu(), before[:, 3 + N :].cpu())
        assert torch.equal(fused.cpu()[untouched], before.cpu()[untouched])


def meta_to_cpu(meta):
    """add_lora_ref reads the metadata with .tolist(); the same metadata on CPU."""
    return build_lora_meta(meta.token_slots.tolist(), meta.slot_ranks.tolist())


def test_grid_covers_every_value():
    counts = {n: {str(v): 0 for v in vals} for n, vals in AXES.items()}
    for c in CASES:
        for n in AXES:
            counts[n][str(c[n])] += 1
    assert all(k >= 3 for per_axis in counts.values() for k in per_axis.values()), counts


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_sgmv_add_lora(case, device):
    check_add_lora([add_lora_sgmv], case, device)


@pytest.mark.parametrize("case", [c for c in CASES if c["num_tokens"] <= 33][::2], ids=_case_id)
def test_bgmv_add_lora(case, device):
    check_add_lora([add_lora_bgmv], case, device)


@pytest.mark.parametrize("shrink", [sgmv_shrink, bgmv_shrink])
def test_shrink_writes_each_token_rank_columns(shrink, device):
    """v in token order, A's interleaved columns, zero beyond the token's rank."""
    case = dict(dtype=torch.float32, rank="mixed", hidden=64, popularity="uniform", num_tokens=33, n_proj=3)
    _, x, A, _, _, meta = make_problem(case, device)
    v = shrink(x, A, view(shrink, meta)).cpu()
    ranks = meta.slot_ranks.tolist()
    for t, s in enumerate(meta.token_slots.tolist()):
        if s < 0:
            assert not v[t].any()
            continue
        r = ranks[s]
        expected = x[t].cpu() @ slot_a(A.cpu(), s, r)
        torch.testing.assert_close(v[t, : r * 3], expected, atol=1e-5, rtol=1e-5)
        assert not v[t, r * 3 :].any()


def test_no_adapter_step_launches_nothing(device, monkeypatch):
    case = dict(dtype=torch.bfloat16, rank=16, hidden=64, popularity="none", num_tokens=7, n_proj=3)
    fused, x, A, Bs, out_slices, meta = make_problem(case, device)

    def fail(fn):
        raise AssertionError(f"launched {fn.__name__} for a step without adapters")
    monkeypatch.setattr(sgmv, "kernel", fail)
    before = fused.clone()
    for impl in (add_lora_triton, add_lora_sgmv, add_lora_bgmv):
        impl(fused[:, : sum(s for _, s in out_slices)], x, A, Bs, out_slices, view(impl, meta))
    assert torch.equal(fused, before)


@pytest.mark.parametrize("impl", [add_lora_sgmv, add_lora_bgmv])
def test_add_fills_no_buffer(impl, device, monkeypatch):
    """The shrink's partials are summed by the expand, so an add allocates v uninitialized:
    no memset per LoRA layer in a decode graph. hidden 4096 splits the reduction."""
    case = dict(dtype=torch.float32, rank=16, hidden=4096, popularity="uniform", num_tokens=7, n_proj=1)
    fused, x, A, Bs, out_slices, meta = make_problem(case, device)
    y = fused[:, : out_slices[0][1]]
    expected = add_lora_ref(y.float().cpu().clone(), x.cpu(), A.cpu(), [B.cpu() for B in Bs], out_slices,
                            meta_to_cpu(meta))
    meta = view(impl, meta)

    def no_fill(*args, **kwargs):
        raise AssertionError("the LoRA add zero-filled a buffer")
    monkeypatch.setattr(torch, "zeros", no_fill)
    monkeypatch.setattr(torch, "zeros_like", no_fill)
    impl(y, x, A, Bs, out_slices, meta)
    monkeypatch.undo()
    torch.testing.assert_close(y.cpu(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_tokens, expected", [(1, "bgmv"), (sgmv.BGMV_MAX_TOKENS, "bgmv"),
                                                  (sgmv.BGMV_MAX_TOKENS + 1, "sgmv")])
def test_small_steps_take_bgmv(num_tokens, expected, device, monkeypatch):
    """The decode-shaped kernels where they measured faster, chosen by token count only."""
    case = dict(dtype=torch.float32, rank=8, hidden=64, popularity="uniform", num_tokens=num_tokens, n_proj=1)
    _, x, A, Bs, out_slices, meta = make_problem(case, device)
    y = torch.zeros(num_tokens, out_slices[0][1], device=device)
    taken = []
    for name in ("sgmv", "bgmv"):
        monkeypatch.setattr(sgmv, f"add_lora_{name}", lambda *a, name=name: taken.append(name))
    add_lora_triton(y, x, A, Bs, out_slices, LoRABlocks.of(meta))
    assert taken == [expected]


def test_dispatch_is_one_branch_on_device():
    """CPU tensors take the torch path even with triton installed."""
    case = dict(dtype=torch.float32, rank=8, hidden=64, popularity="uniform", num_tokens=7, n_proj=2)
    fused, x, A, Bs, out_slices, meta = make_problem(case, "cpu")
    kernels = select_kernels(x.device)
    assert kernels.name == "torch"
    N = sum(s for _, s in out_slices)
    expected = add_lora_ref(fused[:, :N].clone(), x, A, Bs, out_slices, meta)
    step = kernels.lora_meta(meta.token_slots.tolist(), meta.slot_ranks.tolist(), x.device)
    torch.testing.assert_close(kernels.add_lora(fused[:, :N], x, A, Bs, out_slices, step), expected)


def test_graph_buffers_keep_addresses_and_results(device):
    """Steps of different shapes filled into one LoRAMetaBuffers: the same device memory
    every step (what a captured CUDA graph reads), and the same result as a fresh meta."""
    case = dict(dtype=torch.float32, rank="mixed", hidden=64, popularity="uniform", num_tokens=40, n_proj=2)
    fused, x, A, Bs, out_slices, meta = make_problem(case, device)
    N = sum(s for _, s in out_slices)
    buffers = LoRAMetaBuffers(max_tokens=40, max_loras=meta.max_loras, device=device)
    ranks = meta.slot_ranks.tolist()
    addresses = None
    for slots in ([3, -1, 0, 3, 7, 7, 7, 1] * 5, [5] * 33, [-1, 2] * 3):
        step = buffers.fill(slots, ranks)
        ptrs = [t.data_ptr() for t in (step.meta.token_slots, step.meta.sorted_token_idx, step.meta.seg_starts,
                                        step.meta.seg_slots, step.meta.slot_ranks, step.block_slots,
                                        step.block_ranks, step.block_starts, step.block_ends)]
        assert addresses in (None, ptrs)
        addresses = ptrs
        y = torch.zeros(40, N, device=device)                     # rows padded to max_tokens
        add_lora_triton(y, x, A, Bs, out_slices, step)
        fresh = build_lora_meta(slots, ranks)
        expected = add_lora_ref(torch.zeros(len(slots), N), x[: len(slots)].cpu(), A.cpu(), [B.cpu() for B in Bs],
                                out_slices, fresh)
        torch.testing.assert_close(y[: len(slots)].cpu(), expected, atol=1e-4, rtol=1e-4)
        assert not y[len(slots):].any()


def test_launcher_rejects_mismatched_dtypes(device):
    case = dict(dtype=torch.float16, rank=8, hidden=64, popularity="uniform", num_tokens=7, n_proj=1)
    _, x, A, _, _, meta = make_problem(case, device)
    with pytest.raises(AssertionError, match="share a dtype"):
        sgmv_shrink(x.float(), A, LoRABlocks.of(meta))


GPU_CASES = [c for c in (dict(zip(AXES, values)) for values in itertools.product(*AXES.values()))
             if _weight_elements(c) <= 10 * MAX_WEIGHT_ELEMENTS]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", AXES["dtype"], ids=str)
@pytest.mark.parametrize("popularity", AXES["popularity"])
def test_full_grid_on_gpu(dtype, popularity):
    for case in GPU_CASES:
        if case["dtype"] == dtype and case["popularity"] == popularity:
            check_add_lora([add_lora_sgmv, add_lora_bgmv], case, "cuda")
