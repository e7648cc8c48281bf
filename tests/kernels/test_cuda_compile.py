"""Every Triton kernel compiles for CUDA (sm_80, sm_90) on a machine without a GPU.

The interpreter accepts programs the compiler rejects (branch-typed pointers, early
returns, dot shapes), so CI also compiles each kernel to a cubin with the constexprs its
launcher picks on a GPU. Triton decides interpret vs compile per process, so the
compilation runs in a child process: this file run as a script.
"""

import inspect
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")


def _signature(fn, types: dict, constexprs: dict) -> dict:
    """Argument types in the kernel's parameter order: `types` by name, else by suffix."""
    out = {}
    for name in inspect.signature(fn).parameters:
        if name in constexprs:
            out[name] = "constexpr"
        elif name in types:
            out[name] = types[name]
        else:
            out[name] = "i32" if not name.endswith("_ptr") else "*i32"
    return out


def compile_all(arch: int, dtypes: list[str]) -> None:
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from loraserve.kernels import paged_attention as pa
    from loraserve.kernels import sgmv
    from loraserve.kernels.lora_meta import SGMV_BLOCK_M

    target = GPUTarget("cuda", arch, 32)

    def build(fn, types, constexprs):
        src = ASTSource(JITFunction(fn), _signature(fn, types, constexprs), constexprs=constexprs)
        triton.compile(src, target=target)

    tl_dtype = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}
    for dt in dtypes:
        act = {n: "*" + dt for n in ("x_ptr", "a_ptr", "y_ptr", "b0_ptr", "b1_ptr", "b2_ptr", "q_ptr", "out_ptr",
                                     "k_ptr", "v_cache_ptr", "k_cache_ptr")}
        lora = {**act, "v_ptr": "*fp32", "sorted_idx_ptr": "*i64", "proj_ptr": "*i64"}
        for n_proj, split_k in [(1, 1), (3, 16)]:
            build(sgmv._sgmv_shrink_kernel, lora, dict(N_PROJ=n_proj, BLOCK_M=SGMV_BLOCK_M, BLOCK_N=64, BLOCK_K=64,
                                                       SPLIT_K=split_k, DOT_DTYPE=tl_dtype[dt], PRECISION="ieee"))
            build(sgmv._sgmv_expand_kernel, lora, dict(N_PROJ=n_proj, BLOCK_M=SGMV_BLOCK_M, BLOCK_N=256, BLOCK_K=16,
                                                       DOT_DTYPE=tl_dtype[dt], PRECISION="ieee"))
            build(sgmv._bgmv_shrink_kernel, lora, dict(N_PROJ=n_proj, BLOCK_N=64, BLOCK_K=64, SPLIT_K=split_k))
            build(sgmv._bgmv_expand_kernel, lora, dict(N_PROJ=n_proj, BLOCK_N=128, BLOCK_K=16))
        kv = {**act, "v_ptr": "*" + dt, "slot_ptr": "*i64", "block_tables_ptr": "*i64", "context_lens_ptr": "*i32",
              "scale_log2": "fp32"}
        build(pa._store_kv_kernel, kv, dict(NUM_KV_HEADS=8, HEAD_DIM=64, BLOCK=512))
        block_n = 32 if dt == "fp32" else 64
        for group, head_dim in [(1, 128), (3, 40), (8, 64)]:
            common = dict(NUM_KV_HEADS=2, GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=16, BLOCK_N=block_n,
                          D_PAD=max(16, triton.next_power_of_2(head_dim)), DOT_DTYPE=tl_dtype[dt])
            build(pa._paged_decode_kernel, kv, dict(common, GROUP_PAD=max(16, triton.next_power_of_2(group))))
            build(pa._paged_prefill_kernel, kv, dict(common, TILE_TOKENS=64 // group, BLOCK_R=64))


def _has_cuda_backend() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        return False
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


@pytest.mark.skipif(not _has_cuda_backend(), reason="triton without its CUDA backend and ptxas")
def test_kernels_compile_for_cuda():
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


if __name__ == "__main__":
    compile_all(90, ["bf16", "fp16", "fp32"])
    compile_all(80, ["bf16"])
