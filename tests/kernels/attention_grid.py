"""The paged-attention test grid, shared by the Triton kernels' tests and the CPU path's:
dtype x block size x GQA ratio x head dim as a Latin square (every block size and every
GQA ratio meets every head dim), odd decode context lengths, and prefill of new tokens
after cached prefixes."""

import torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BLOCK_SIZES = [1, 5, 16, 32]
HEADS = [(4, 4), (8, 2), (9, 3), (8, 1)]           # (H, H_kv): GQA ratios 1, 4, 3, 8
HEAD_DIMS = [16, 40, 64, 128]
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}

DECODE_CONTEXTS = [1, 17, 100, 33, 64]
# (new tokens, context length): plain prompts (q == ctx) and new tokens after a prefix
PREFILL = [(7, 7), (5, 37), (1, 64), (33, 33), (20, 21), (16, 100)]

CASES = [dict(dtype=DTYPES[(4 * i + j) % 3], block_size=bs, heads=heads, head_dim=HEAD_DIMS[(i + j) % 4])
         for i, bs in enumerate(BLOCK_SIZES) for j, heads in enumerate(HEADS)]


def case_id(c: dict) -> str:
    dt = str(c["dtype"]).removeprefix("torch.")
    return f"{dt}-bs{c['block_size']}-H{c['heads'][0]}kv{c['heads'][1]}-D{c['head_dim']}"


def make_cache(case: dict, context_lens: list[int], device: str, seed: int = 0):
    """Random caches with more blocks than the sequences own, and block tables that
    scatter each sequence over a random permutation of them (unused entries 0)."""
    gen = torch.Generator().manual_seed(seed)
    bs, (H, H_kv), D = case["block_size"], case["heads"], case["head_dim"]
    need = [-(-c // bs) for c in context_lens]
    num_blocks = sum(need) + 3
    k_cache = torch.randn(num_blocks, bs, H_kv, D, generator=gen)
    v_cache = torch.randn(num_blocks, bs, H_kv, D, generator=gen)
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(context_lens), max(need) + 2, dtype=torch.int64)
    for i, n in enumerate(need):
        tables[i, :n] = torch.tensor(perm[sum(need[:i]) : sum(need[:i]) + n])
    to = dict(device=device, dtype=case["dtype"])
    return k_cache.to(**to), v_cache.to(**to), tables.to(device)


def qkv_views(T: int, case: dict, device: str, seed: int = 1):
    """q, k, v as strided views of one fused projection output, as the model makes them."""
    gen = torch.Generator().manual_seed(seed)
    (H, H_kv), D = case["heads"], case["head_dim"]
    qkv = torch.randn(T, (H + 2 * H_kv) * D, generator=gen).to(device=device, dtype=case["dtype"])
    q, k, v = qkv.split([H * D, H_kv * D, H_kv * D], dim=-1)
    return q.view(T, H, D), k.view(T, H_kv, D), v.view(T, H_kv, D)

# Sliding window and soft-capping (Gemma 2, Mistral): each variant on four cases of the
# square (every block size, every GQA ratio once), windows shorter and longer than a
# tile of keys, a window of 1 (a token sees only itself), and a window past the context.
VARIANTS = [dict(window=8), dict(softcap=5.0), dict(window=20, softcap=30.0), dict(window=1), dict(window=500)]
VARIANT_CASES = [dict(c, **v) for v in VARIANTS for c in CASES[::5]]


def variant_id(c: dict) -> str:
    extra = "".join(f"-{k}{c[k]}" for k in ("window", "softcap") if k in c)
    return case_id(c) + extra


def attention_kwargs(case: dict) -> dict:
    return {k: case[k] for k in ("window", "softcap") if k in case}
