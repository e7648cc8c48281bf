"""Kernel tests run the Triton kernels against their torch references.

Without CUDA the kernels run under Triton's interpreter on CPU tensors. TRITON_INTERPRET
is set here, at import. Triton reads it when a function is decorated with triton.jit: our
launchers decorate their kernels at first launch, so that is late enough for them; but
triton.language decorates its own helpers (tl.zeros, tl.sum, tl.max, ...) when triton is
first imported, and another conftest (transformers, for the model tests) may import it
before this file runs. Those helpers are then re-wrapped for the interpreter.
With CUDA the kernels compile and the tests run them on the GPU.
"""

import os
import sys

import pytest
import torch


def _interpret_triton_language() -> None:
    """Swap triton.language's compiled-mode helpers for interpreted ones (test-only)."""
    if "triton" not in sys.modules:
        return                                  # triton will read the variable on import
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    swapped: dict[int, InterpretedFunction] = {}
    namespaces = [m for name, m in list(sys.modules.items())
                  if m is not None and (name == "triton.language" or name.startswith("triton.language."))]
    for ns in namespaces + [tl.core.tensor]:
        for name, obj in list(vars(ns).items()):
            if isinstance(obj, JITFunction):
                new = swapped.setdefault(id(obj), InterpretedFunction(obj.fn))
                setattr(ns, name, new)


if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    _interpret_triton_language()


@pytest.fixture
def device() -> str:
    """Where the Triton kernels run: the interpreter reads CPU tensors."""
    import triton

    return "cpu" if triton.knobs.runtime.interpret else "cuda"
