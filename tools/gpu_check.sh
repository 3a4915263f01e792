#!/usr/bin/env bash
# The GPU checks in one script, for a CUDA machine (a cluster node, or the lent H100/H200 where
# megatron-core and r1mega's pure-Python dependencies travel as wheels in .whl/):
#   1. build the CUDA ops from csrc/        2. the `gpu`-marked tests (TE ones skip without TE)
#   3. memory: the learner memory handoff (offload frees >= 90% of grad + optimizer bytes; training
#      after an offload/onload cycle is bit-identical), needs megatron-core and CUDA, not vLLM
#   4. bench_mfu: SequentialMLP vs grouped-GEMM experts on an 8-layer, 64-expert MoE in bf16
#   5. bench_logprob on CUDA: naive vs torch-chunked vs the CUDA op at vocab 152k
#   rl (on request): GRPO steps with rollout.engine=megatron (generation by megatron-core inside the learner:
#      no vLLM, TE or flash-attn) on a Qwen3-30B-A3B-shaped policy cut to 4 layers, bf16, grouped-GEMM experts:
#      tokens/s/GPU, generation and training tokens/s, learner MFU, peak memory (tools/bench_rl_step.py)
# Each step's log goes to $OUT/<step>.log (default runs/gpu_check); a failing step does not stop
# the others. Usage: bash tools/gpu_check.sh [steps...]   (default: build tests memory mfu logprob; also: rl)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

step() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
    tail -n "${TAIL:-30}" "$OUT/$name.log"
}

MOE_2B=(--model qwen3_moe --set num_layers=8 --set hidden_size=2048 --set num_attention_heads=16
        --set num_query_groups=4 --set kv_channels=128 --set num_experts=64 --set moe_router_topk=8
        --set moe_ffn_hidden_size=768 --set vocab_size=32000 --set precision=bf16 --seq-len 4096 --batch 2)

for s in "${@:-build tests memory mfu logprob}"; do
    for one in $s; do
        case $one in
            build) nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
                   $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
                   step build 200 $PY -m r1mega.kernels.build -v ;;
            tests) step tests 150 $PY -m pytest -q -m gpu -p no:cacheprovider -rA tests/test_kernels.py \
                       tests/test_grouped_experts.py tests/test_gpu_training.py tests/test_accelerated_paths.py \
                       tests/test_refit_transport.py
                   step spec 120 $PY -m pytest -q -p no:cacheprovider tests/test_accelerated_paths.py -k local_spec ;;
            memory) step memory 150 env CUBLAS_WORKSPACE_CONFIG=:4096:8 $PY -m pytest -q -s -p no:cacheprovider -rA \
                        tests/test_memory_handoff.py ;;
            mfu) step mfu 180 $PY tools/bench_mfu.py "${MOE_2B[@]}" --steps 3 --warmup 1 --experts-compare --json ;;
            logprob) step logprob 90 $PY tools/bench_logprob.py --device cuda --dtype bfloat16 --vocab 152064 \
                         --tokens 16384 --hidden 4096 --chunk 4096 --repeat 3 ;;
            rl) step rl 480 $PY tools/bench_rl_step.py --gpu --layers 4 ;;
            *) echo "unknown step $one (build tests memory mfu logprob rl)"; exit 2 ;;
        esac
    done
done
