"""Every Triton kernel compiles for CUDA (sm_80, sm_90) on a machine without a GPU.

The interpreter accepts programs the compiler rejects (branch-typed pointers, early
returns, dot shapes), so CI also compiles each kernel to a cubin with the constexprs its
launcher picks on a GPU. Triton decides interpret vs compile per process, so the
compilation runs in a child process: this file run as a script.

The LoRA kernels are bound by reading adapter weights, and the compiled code shows how
they read them: the PTX of a bf16 decode launch (aligned pointers and strides, as a
real launch specializes them) must load A and B in 16-byte vectors. Masks on values
read from memory once made every weight load a 2-byte scalar; this catches that.
"""

import inspect
import os
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")


def _signature(fn, types: dict, constexprs: dict) -> tuple[dict, dict]:
    """Argument types in the kernel's parameter order (`types` by name, else by suffix),
    and the attributes a launch gives them: pointers 16-byte aligned and ints divisible
    by 16 (decode shapes: hidden 4096, rank 16), as torch allocations and Triton's
    specialization make them."""
    out, attrs = {}, {}
    for i, name in enumerate(inspect.signature(fn).parameters):
        if name in constexprs:
            out[name] = "constexpr"
            continue
        out[name] = types.get(name, "i32" if not name.endswith("_ptr") else "*i32")
        if name.endswith("_ptr") or name.startswith(("stride_", "in_features")):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return out, attrs


def _scalar_and_vector_loads(ptx: str) -> tuple[int, int]:
    """Counts of 2-byte scalar and 16-byte vector global loads (plain or async) in PTX."""
    scalar = len(re.findall(r"ld\.global(\.[a-zA-Z0-9_:]+)*\.b16\b", ptx))
    vector = len(re.findall(r"ld\.global(\.[a-zA-Z0-9_:]+)*\.v4\.b32\b", ptx))
    vector += len(re.findall(r"cp\.async\.c[ag]\.shared\.global \[[^]]*\], \[[^]]*\], 0x10", ptx))
    return scalar, vector


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
        signature, attrs = _signature(fn, types, constexprs)
        src = ASTSource(JITFunction(fn), signature, constexprs=constexprs, attrs=attrs)
        return triton.compile(src, target=target).asm["ptx"]

    def weights_in_vectors(name, ptx, scalar_ok):
        scalar, vector = _scalar_and_vector_loads(ptx)
        assert scalar <= scalar_ok and vector > 0, f"{name}: {scalar} 2-byte and {vector} 16-byte loads"

    tl_dtype = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}
    for dt in dtypes:
        act = {n: "*" + dt for n in ("x_ptr", "a_ptr", "y_ptr", "b0_ptr", "b1_ptr", "b2_ptr", "q_ptr", "out_ptr",
                                     "k_ptr", "v_cache_ptr", "k_cache_ptr")}
        lora = {**act, "v_ptr": "*fp32", "sorted_idx_ptr": "*i64", "proj_ptr": "*i64"}
        launch = sgmv.DEFAULT_LAUNCH
        for n_proj, split_k in [(1, 1), (1, 8), (3, 16)]:
            block_n = triton.next_power_of_2(16 * n_proj)          # rank 16: what the launchers pick
            ptx = {
                "sgmv_shrink": build(sgmv._sgmv_shrink_kernel, lora, dict(
                    N_PROJ=n_proj, ROW_ALIGN=sgmv.ROW_ALIGN, BLOCK_M=SGMV_BLOCK_M, BLOCK_N=block_n,
                    BLOCK_K=launch.shrink_block_k, SPLIT_K=split_k, DOT_DTYPE=tl_dtype[dt], PRECISION="ieee")),
                "sgmv_expand": build(sgmv._sgmv_expand_kernel, lora, dict(
                    N_PROJ=n_proj, VEC=8, SPLIT_K=split_k, BLOCK_M=SGMV_BLOCK_M, BLOCK_N=launch.expand_block_n,
                    BLOCK_K=16, DOT_DTYPE=tl_dtype[dt], PRECISION="ieee")),
                "bgmv_shrink": build(sgmv._bgmv_shrink_kernel, lora, dict(
                    N_PROJ=n_proj, ROW_ALIGN=sgmv.ROW_ALIGN, BLOCK_N=block_n, BLOCK_K=64, SPLIT_K=split_k)),
                "bgmv_expand": build(sgmv._bgmv_expand_kernel, lora, dict(N_PROJ=n_proj, VEC=8, SPLIT_K=split_k,
                                                                           BLOCK_N=128, BLOCK_K=16)),
            }
            if dt == "bf16" and n_proj == 1:
                # SGMV: nothing scalar at all; BGMV: one scalar of x (shrink) or y (expand) per thread
                for name, code in ptx.items():
                    weights_in_vectors(f"{name} (n_proj 1, split {split_k})", code, 0 if "sgmv" in name else 1)
            build(sgmv._sgmv_expand_kernel, lora, dict(N_PROJ=n_proj, VEC=1, SPLIT_K=1, BLOCK_M=SGMV_BLOCK_M,
                                                       BLOCK_N=256, BLOCK_K=16, DOT_DTYPE=tl_dtype[dt],
                                                       PRECISION="ieee"))
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
