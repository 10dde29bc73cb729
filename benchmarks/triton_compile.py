"""Compile a Triton kernel for a GPU that is not here: the interpreter accepts code that the
compiler rejects (types, block shapes, constexpr use), and what the compiler emits (registers,
spills, shared memory, instructions) is evidence about a kernel without the hardware.

Run it with ``TRITON_INTERPRET=0`` set before the kernels are defined (a subprocess in tests).
"""

from __future__ import annotations


def compile_for_gpu(
    kernel, types: dict, constexprs: dict, arch: int = 90, num_warps: int = 4, num_stages: int = 3
):
    """Compile ``kernel`` for ``sm_<arch>`` with Triton's bundled ptxas; returns the compiled
    kernel (``.asm["ptx"]``, ``.asm["cubin"]``, ``.n_regs``, ``.n_spills``, ``.metadata``).

    types: Triton type of every non-constexpr argument ("*fp16", "i32", "fp32", ...), by name;
    an argument named in neither dict is an error naming it. constexprs: name -> value.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from flash_attn.ops.launch import unwrap_jit

    fn = unwrap_jit(kernel)
    missing = [n for n in fn.arg_names if n not in types and n not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: no type given for arguments {missing}")
    signature = {n: "constexpr" if n in constexprs else types[n] for n in fn.arg_names}
    constants = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(
        ASTSource(fn, signature, constants), target=GPUTarget("cuda", arch, 32), options=options
    )
