"""Check attention gradients: standard attention vs the paper's tiled algorithm vs the kernels.

The gradients are those of loss = sum(out) with respect to q, k and v.

- oracle: standard attention (materialised scores), jacrev, in fp64.
- plain: standard attention at --dtype; its error against the oracle sets the tolerance
  (a method passes when its error is at most 2x plain's, plus a small atol).
- (a) jacrev: the tiled forward differentiated by torch.func.jacrev through its loops.
- (b) paper backward: the tiled autograd.Function, whose backward recomputes P from the lse.
- (c) kernels: the Triton forward/backward, when Triton can run here (a GPU, or
  TRITON_INTERPRET=1 set in the environment on CPU), the mask given as attn_bias; they do not
  take fp64, so fp64 checks them in fp32.

    PYTHONPATH=. python scripts/check_backward.py --causal --seqlen-q 65 --seqlen-k 47
    TRITON_INTERPRET=1 PYTHONPATH=. python scripts/check_backward.py --dtype fp32

Exit status 0 when everything passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys

import torch

from flash_attn.ops.attention.reference import attention_ref
from flash_attn.ops.attention.tiled import Tiling, attention_tiled, attention_tiled_fwd
from flash_attn.ops.backend import resolve_backend

DTYPES = {
    "fp64": torch.float64,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
# Small absolute slack on top of 2x plain PyTorch's error, per dtype.
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--causal", action="store_true", help="bottom-right aligned causal mask")
    p.add_argument(
        "--mask",
        choices=["none", "random"],
        default="none",
        help="random: a random boolean mask with some fully masked rows",
    )
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--heads-k", type=int, default=None, help="key/value heads (GQA); = --heads")
    p.add_argument("--seqlen-q", type=int, default=65)
    p.add_argument("--seqlen-k", type=int, default=47)
    p.add_argument("--headdim", type=int, default=32)
    p.add_argument("--block-m", type=int, default=16, help="query block of the tiled algorithm")
    p.add_argument("--block-n", type=int, default=16, help="key block of the tiled algorithm")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp64")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.heads_k = args.heads_k or args.heads
    if args.heads % args.heads_k:
        p.error(f"--heads ({args.heads}) must be a multiple of --heads-k ({args.heads_k})")
    for name in ("batch", "heads", "seqlen_q", "seqlen_k", "headdim", "block_m", "block_n"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def random_mask(batch, nheads, seqlen_q, seqlen_k, device, generator=None) -> torch.Tensor:
    """Bool (batch, nheads, seqlen_q, seqlen_k), ~half True, with one fully masked row per head."""
    mask = torch.rand(batch, nheads, seqlen_q, seqlen_k, generator=generator) < 0.5
    mask[:, :, seqlen_q // 2] = False
    return mask.to(device)


def _jacrev_grads(fn, q, k, v):
    """(dq, dk, dv) of sum(fn(q, k, v)) by torch.func.jacrev."""
    loss = lambda q, k, v: fn(q, k, v).sum()  # noqa: E731
    return torch.func.jacrev(loss, argnums=(0, 1, 2))(q, k, v)


def _autograd_grads(fn, q, k, v):
    """(dq, dk, dv) of sum(fn(q, k, v)) by .backward-style autograd (custom Functions)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    return torch.autograd.grad(out, (q, k, v), torch.ones_like(out))


def _kernel_fn(causal, mask):
    """The Triton path: flash_attn_func(backend="triton"), the mask passed as attn_bias."""
    from flash_attn import flash_attn_func

    def kernel(q, k, v):
        return flash_attn_func(q, k, v, causal=causal, attn_bias=mask, backend="triton")

    return "flash_attn_func(backend='triton')", kernel


def _triton_usable(device) -> bool:
    try:
        resolve_backend("triton", torch.device(device))
    except ValueError:
        return False
    return True


def _max_errors(grads, grads_ref):
    return [(g.double() - r.double()).abs().max().item() for g, r in zip(grads, grads_ref)]


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(args.seed)
    shape_q = (args.batch, args.seqlen_q, args.heads, args.headdim)
    shape_k = (args.batch, args.seqlen_k, args.heads_k, args.headdim)
    q64, k64, v64 = (
        torch.randn(s, generator=gen, dtype=torch.float64).to(device)
        for s in (shape_q, shape_k, shape_k)
    )
    mask = None
    if args.mask == "random":
        mask = random_mask(args.batch, args.heads, args.seqlen_q, args.seqlen_k, device, gen)
    causal = args.causal
    blocks = dict(block_m=args.block_m, block_n=args.block_n)
    print(
        f"q {shape_q}, k/v {shape_k}, causal={causal}, mask={args.mask}, dtype={args.dtype}, "
        f"device={device}, blocks={args.block_m}x{args.block_n}"
    )

    def standard(q, k, v):
        return attention_ref(q, k, v, causal=causal, attn_bias=mask)[0]

    def tiled_loops(q, k, v):
        return attention_tiled_fwd(q, k, v, Tiling(causal=causal, mask=mask, **blocks))[0]

    def tiled_paper(q, k, v):
        return attention_tiled(q, k, v, causal=causal, mask=mask, **blocks)

    oracle = _jacrev_grads(standard, q64, k64, v64)
    results = []  # (name, errors, bound)

    def check(name, grads, plain_errors, dtype):
        errors = _max_errors(grads, oracle)
        bounds = [2 * e + ATOL[dtype] for e in plain_errors]
        ok = all(e <= b for e, b in zip(errors, bounds)) and all(
            torch.isfinite(g).all() for g in grads
        )
        results.append(ok)
        errs = "  ".join(f"d{n} {e:.2e} (<= {b:.1e})" for n, e, b in zip("qkv", errors, bounds))
        print(f"  {'PASS' if ok else 'FAIL'}  {name:<44} {errs}")

    q, k, v = (t.to(dtype) for t in (q64, k64, v64))
    plain = _max_errors(_jacrev_grads(standard, q, k, v), oracle)
    print(
        f"  ----  plain standard attention, jacrev, {args.dtype:<14} "
        + "  ".join(f"d{n} {e:.2e}" for n, e in zip("qkv", plain))
    )
    check(
        "(a) tiled forward, jacrev through the loops",
        _jacrev_grads(tiled_loops, q, k, v),
        plain,
        dtype,
    )
    check(
        "(b) tiled autograd.Function (paper backward)",
        _autograd_grads(tiled_paper, q, k, v),
        plain,
        dtype,
    )

    if not _triton_usable(device):
        print(
            "  note  (c) kernels skipped: Triton cannot run here "
            "(no GPU; set TRITON_INTERPRET=1 to use the interpreter on CPU)"
        )
    else:
        kdtype = torch.float32 if dtype == torch.float64 else dtype
        kq, kk, kv = (t.to(kdtype) for t in (q64, k64, v64))
        kplain = _max_errors(_jacrev_grads(standard, kq, kk, kv), oracle)
        name, kernel = _kernel_fn(causal, mask)
        note = "" if kdtype == dtype else " (fp32: kernels take no fp64)"
        print(
            f"  ----  plain standard attention at {str(kdtype)[6:]}{note}: "
            + "  ".join(f"d{n} {e:.2e}" for n, e in zip("qkv", kplain))
        )
        check(f"(c) {name}", _autograd_grads(kernel, kq, kk, kv), kplain, kdtype)

    ok = all(results)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
