"""Linear + activation with the activation in the matmul epilogue, in Triton, and launchers.

Forward: one tiled matmul ``x @ W.T + b`` whose epilogue applies the activation before the tile
is written, so the pre-activation never makes a round trip through memory just to be activated.
The gated variant (SwiGLU, GeGLU, GLU) reads W as ``[W_up; W_gate]`` stacked along the output
dimension, the layout of the official flash-attn GatedMlp's fc1, keeps two accumulators per tile
and writes ``(x W_up.T + b_up) * act(x W_gate.T + b_gate)`` in one epilogue.

Backward: an elementwise kernel applies the activation's derivative to the saved pre-activation
(dpre = dout * act'(pre), or its gated form); the two matmuls dx = dpre @ W and dW = dpre.T @ x
are left to cuBLAS, which is as fast as anything written here for plain matmuls.

Layout: x (..., K) any strides; W (N, K) or (2N, K) gated, any strides (``nn.Linear`` layout);
bias (N,) or (2N,); out (..., N) contiguous; pre (M, N) or (M, 2N) contiguous. Accumulation and
the activation are in fp32; results are cast to x's dtype when stored.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from flash_attn.ops.backend import interpreter_enabled
from flash_attn.ops.launch import (
    LaunchPlan,
    cdiv,
    device_guard,
    largest,
    row_strides,
)
from flash_attn.ops.plans import PlanCache, call_signature, contiguous_aligned


@triton.jit
def _tanh(x):
    # tanh(x) = 2 * sigmoid(2x) - 1, saturating cleanly at +-1 for large |x|.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _activation(x, ACTIVATION: tl.constexpr):
    if ACTIVATION == "gelu":
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACTIVATION == "gelu_approx":
        return 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif ACTIVATION == "relu":
        return tl.maximum(x, 0.0)
    elif ACTIVATION == "sqrelu":
        r = tl.maximum(x, 0.0)
        return r * r
    elif ACTIVATION == "silu":
        return x * tl.sigmoid(x)
    else:  # sigmoid
        return tl.sigmoid(x)


@triton.jit
def _activation_grad(x, ACTIVATION: tl.constexpr):
    """d act(x) / dx."""
    if ACTIVATION == "gelu":
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        return cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    elif ACTIVATION == "gelu_approx":
        t = _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
        dt = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dt
    elif ACTIVATION == "relu":
        return tl.where(x > 0.0, 1.0, 0.0)
    elif ACTIVATION == "sqrelu":
        return 2.0 * tl.maximum(x, 0.0)
    elif ACTIVATION == "silu":
        s = tl.sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    else:  # sigmoid
        s = tl.sigmoid(x)
        return s * (1.0 - s)


def _configs():
    if interpreter_enabled():
        # The interpreter runs programs one by one in NumPy: few, large tiles are fastest.
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=3)
        for bm in (64, 128)
        for bn in (64, 128)
        for bk in (32, 64)
        for w in (4, 8)
    ]


# fp32 accumulator elements per thread a tile may hold (the gated kernel holds two per output):
# 128 spill on sm_80 and sm_90, 64 do not (scripts/kernel_report.py).
ACCUMULATORS_PER_THREAD = 64


def _prune(configs, named_args, **kwargs):
    """The configs whose accumulators fit in registers, and of those with the same warps, the
    ones with the largest tiles (the fewest loads per output): six per key."""
    gated = kwargs.get("GATED", named_args.get("GATED"))
    tile = lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]  # noqa: E731
    fits = [
        c for c in configs if (1 + gated) * tile(c) <= ACCUMULATORS_PER_THREAD * 32 * c.num_warps
    ]
    return largest(fits, lambda c: c.num_warps, tile) or configs[:1]


@triton.autotune(
    configs=_configs(),
    key=["N", "K", "ACTIVATION", "GATED"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _linear_act_fwd_kernel(
    X,  # (M, K)
    W,  # (N, K), or (2N, K) = [W_up; W_gate] when GATED
    Bias,  # (N,) or (2N,); read only when HAS_BIAS
    Out,  # (M, N) contiguous
    Pre,  # (M, N) or (M, 2N) contiguous: pre-activation, written only when STORE_PRE
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_PRE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped ordering: GROUP_M row blocks sweep the columns together, so their W tiles are
    # reused from L2 instead of re-read from memory.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_size
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_size

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + rows[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    # W^T tiles (BLOCK_K, BLOCK_N) read straight from the (N, K) layout.
    w_ptrs = W + cols[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
    gate_offset = N * stride_wn

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if GATED:
        acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start_k in range(0, K, BLOCK_K):
        in_k = start_k + offs_k < K
        x = tl.load(x_ptrs, mask=(rows[:, None] < M) & in_k[None, :], other=0.0)
        w_mask = in_k[:, None] & (cols[None, :] < N)
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        if GATED:
            w_gate = tl.load(w_ptrs + gate_offset, mask=w_mask, other=0.0)
            acc_gate = tl.dot(x, w_gate, acc_gate, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    in_cols = cols < N
    if HAS_BIAS:
        acc += tl.load(Bias + cols, mask=in_cols, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_gate += tl.load(Bias + N + cols, mask=in_cols, other=0.0).to(tl.float32)[None, :]
    out_mask = (rows[:, None] < M) & in_cols[None, :]
    if GATED:  # noqa: SIM108 (acc_gate exists only when GATED: keep the branches apart)
        out = acc * _activation(acc_gate, ACTIVATION)
    else:
        out = _activation(acc, ACTIVATION)
    out_offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(Out + out_offs, out.to(Out.dtype.element_ty), mask=out_mask)
    if STORE_PRE:
        if GATED:
            pre_offs = rows[:, None].to(tl.int64) * (2 * N) + cols[None, :]
            tl.store(Pre + pre_offs, acc.to(Pre.dtype.element_ty), mask=out_mask)
            tl.store(Pre + pre_offs + N, acc_gate.to(Pre.dtype.element_ty), mask=out_mask)
        else:
            tl.store(Pre + out_offs, acc.to(Pre.dtype.element_ty), mask=out_mask)


@triton.jit
def _act_bwd_kernel(
    DOut,  # (M, N) contiguous
    Pre,  # (M, N) or (M, 2N) contiguous, as stored by the forward
    DPre,  # like Pre: gradient of the pre-activation, [d_up, d_gate] when GATED
    M,
    N,
    ACTIVATION: tl.constexpr,
    GATED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    dout = tl.load(DOut + rows[:, None].to(tl.int64) * N + cols[None, :], mask=mask, other=0.0)
    dout = dout.to(tl.float32)
    if GATED:
        offs = rows[:, None].to(tl.int64) * (2 * N) + cols[None, :]
        up = tl.load(Pre + offs, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(Pre + offs + N, mask=mask, other=0.0).to(tl.float32)
        d_up = dout * _activation(gate, ACTIVATION)
        d_gate = dout * up * _activation_grad(gate, ACTIVATION)
        tl.store(DPre + offs, d_up.to(DPre.dtype.element_ty), mask=mask)
        tl.store(DPre + offs + N, d_gate.to(DPre.dtype.element_ty), mask=mask)
    else:
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        pre = tl.load(Pre + offs, mask=mask, other=0.0).to(tl.float32)
        dpre = dout * _activation_grad(pre, ACTIVATION)
        tl.store(DPre + offs, dpre.to(DPre.dtype.element_ty), mask=mask)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get full-precision products, to match torch.matmul's default (no TF32).
    return "ieee" if dtype == torch.float32 else "tf32"


class LinearActForward:
    """The forward kernel at one call signature (shapes, strides, dtypes, options): built from
    the first call's tensors (their metadata only), then called with each call's tensors.

    Args (construction; the call takes x, weight, bias):
        x: (..., K) fp32/fp16/bf16, any strides.
        weight: (N, K), or (2N, K) = [W_up; W_gate] when gated; x's dtype, any strides.
        bias: None, (N,) or (2N,).
        activation: a key of ``flash_attn.ops.mlp.reference.ACTIVATION_FNS``.
        gated: up * act(gate) rather than act(x @ weight.T + bias).
        store_pre: also return the pre-activation, needed by :class:`ActBackward`.
    Call returns (out, pre):
        out: (..., N) contiguous in x's dtype.
        pre: (M, N), or (M, 2N) = [up, gate] when gated, for the M rows of x, in x's dtype;
            an empty (0,) tensor when store_pre is False.
    """

    def __init__(self, x, weight, bias, *, activation: str, gated: bool, store_pre: bool):
        k, n = x.shape[-1], weight.shape[0] // 2 if gated else weight.shape[0]
        rows = math.prod(x.shape[:-1])
        strides = row_strides(x)
        self.copy_x = strides is None
        stride_xm, stride_xk = (k, 1) if self.copy_x else strides
        self.out_shape = (*x.shape[:-1], n)
        self.pre_shape = (rows, weight.shape[0]) if store_pre else (0,)
        self.dtype, self.device = x.dtype, x.device
        self.empty = rows == 0 or n == 0

        def grid(meta):
            return (cdiv(rows, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]),)

        self.launch = LaunchPlan(
            _linear_act_fwd_kernel,
            grid,
            ("X", "W", "Bias", "Out", "Pre"),
            M=rows,
            N=n,
            K=k,
            stride_xm=stride_xm,
            stride_xk=stride_xk,
            stride_wn=weight.stride(0),
            stride_wk=weight.stride(1),
            ACTIVATION=activation,
            GATED=gated,
            HAS_BIAS=bias is not None,
            STORE_PRE=store_pre,
            DOT_PRECISION=_dot_precision(x.dtype),
            GROUP_M=8,
        )

    def __call__(self, x, weight, bias):
        out = torch.empty(self.out_shape, dtype=self.dtype, device=self.device)
        pre = torch.empty(self.pre_shape, dtype=self.dtype, device=self.device)
        if self.empty:
            return out, pre
        x = x.contiguous() if self.copy_x else x
        with device_guard(x):
            self.launch(x, weight, bias if bias is not None else x, out, pre)
        return out, pre


class ActBackward:
    """The activation's backward at one call signature: dpre = dout * act'(pre) (or its gated
    form), from the output gradient and the forward's stored pre-activation.

    Args (construction): pre: (M, N), or (M, 2N) when gated, as the forward stored it;
        activation, gated: as given to the forward.
    Call (dout, pre): dout (..., N) of the forward's out shape, any layout. Returns dpre like
    pre (contiguous, pre's dtype); the matmuls with it give dx and dW.
    """

    def __init__(self, pre, *, activation: str, gated: bool):
        rows, n = pre.shape[0], pre.shape[1] // 2 if gated else pre.shape[1]
        self.empty = rows == 0 or n == 0
        block_m, block_n = 32, 128
        self.launch = LaunchPlan(
            _act_bwd_kernel,
            (cdiv(rows, block_m), cdiv(n, block_n)),
            ("DOut", "Pre", "DPre"),
            M=rows,
            N=n,
            ACTIVATION=activation,
            GATED=gated,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
        )

    def __call__(self, dout, pre):
        dpre = torch.empty(pre.shape, dtype=pre.dtype, device=pre.device)
        if self.empty:
            return dpre
        dout = contiguous_aligned(dout)
        with device_guard(dout):
            self.launch(dout, pre, dpre)
        return dpre


# -- the launches as functions, one plan per call signature ------------------------------------

_forward_plans, _backward_plans = PlanCache(), PlanCache()


def linear_act_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    gated: bool = False,
    store_pre: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """act(x @ weight.T + bias), or the gated up * act(gate): :class:`LinearActForward`'s
    launch (its arguments and return value) through a plan kept per call signature. Inputs are
    assumed validated."""
    options = dict(activation=activation, gated=gated, store_pre=store_pre)
    key = call_signature((x, weight, bias), tuple(options.values()))
    plan = _forward_plans.get(key)
    if plan is None:
        plan = _forward_plans.keep(key, LinearActForward(x, weight, bias, **options))
    return plan(x, weight, bias)


def linear_act_bwd(dout: torch.Tensor, pre: torch.Tensor, activation: str, gated: bool = False):
    """Gradient of the pre-activation from the output gradient: :class:`ActBackward`'s launch
    (dout (..., N); pre as the forward stored it; returns dpre like pre) through a plan kept
    per call signature."""
    key = call_signature((pre,), (activation, gated))
    plan = _backward_plans.get(key)
    if plan is None:
        plan = _backward_plans.keep(key, ActBackward(pre, activation=activation, gated=gated))
    return plan(dout, pre)
