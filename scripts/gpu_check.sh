#!/usr/bin/env bash
# Everything a machine with one NVIDIA GPU can tell about the kernels, in under 8 minutes:
# the CUDA test subset (compiled kernels, bf16 included), the attention sweep against SDPA
# (head dims 64 and 128, causal and not, seqlen 512 to 16k, forward, backward and both, the
# backward in both schedules: deterministic=False and True), the fused-op and model
# benchmarks. The kernels take their configs from the committed table (one compile per kernel
# and shape, no autotuning). Results go to benchmarks/results/<gpu name>/, the log of each step beside them.
#
#   scripts/gpu_check.sh                 # on the GPU machine
#   scripts/gpu_check.sh --dry-run [DIR] # the same steps on CPU at tiny sizes, into DIR (a
#                                        # temporary folder by default): CI runs this
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python
export PYTHONPATH=.

if [ "${1:-}" = "--dry-run" ]; then
    dry=1
    out=${2:-$(mktemp -d)}
else
    dry=0
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)
    out=benchmarks/results/$(echo "$gpu" | tr -cs 'A-Za-z0-9' '-' | sed 's/-$//')
fi
mkdir -p "$out"
failed=()

# step NAME SECONDS COMMAND...: run it under a time limit, its output to $out/NAME.log.
step() {
    local name=$1 seconds=$2
    shift 2
    echo "== $name (limit ${seconds} s)"
    if timeout "$seconds" "$@" >"$out/$name.log" 2>&1; then
        tail -n 3 "$out/$name.log"
    else
        echo "   FAILED (exit $?), see $out/$name.log"
        failed+=("$name")
    fi
}

if [ $dry = 1 ]; then
    # Collection proves the CUDA subset still imports; the steps below run the real scripts.
    step tests 60 "$PYTHON" -m pytest -q --collect-only tests/ops tests/modules tests/models
    tiny=(--b 1 --h 2 --q_len 64 --kv_len 64 --device cpu --repeats 1 --warmup 0 --no_memory)
    step attention_d64_causal_fwd_bwd 60 "$PYTHON" scripts/bench_attention.py "${tiny[@]}" \
        --d 64 --causal --mode fwd_bwd --type flash
    step attention_d128_fwd_sdpa 60 "$PYTHON" scripts/bench_attention.py "${tiny[@]}" \
        --d 128 --mode fwd --type sdpa
    step attention_d64_bwd_deterministic 60 "$PYTHON" scripts/bench_attention.py "${tiny[@]}" \
        --d 64 --mode bwd --type flash_deterministic
    # Each op's timing includes torch.compile, minutes on a CPU: only the command line and
    # the report are exercised.
    step ops 60 "$PYTHON" scripts/bench_ops.py --device cpu --no-table --no-figure \
        --out "$out/ops.md"
    step model 60 "$PYTHON" scripts/bench_model.py --n-layer 1 --n-embd 32 --n-head 2 \
        --vocab-size 64 --batch 1 --seqlen 16 --repeats 1 --prompt-len 4 --new-tokens 2 \
        --device cpu --out "$out/model.md"
else
    step tests 170 env TRITON_INTERPRET=0 "$PYTHON" -m pytest -q -x \
        tests/ops tests/modules tests/models
    step attention 190 "$PYTHON" scripts/bench_attention.py --sweep --grid official \
        --out_dir "$out"
    step ops 50 "$PYTHON" scripts/bench_ops.py --out "$out/ops.md"
    step model 50 "$PYTHON" scripts/bench_model.py --out "$out/model.md"
fi

echo "results in $out"
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}"
    exit 1
fi
