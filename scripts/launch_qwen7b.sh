#!/usr/bin/env bash
# The paper's 7B recipe scaled out (configs/math_qwen7b_scaleout.yaml; README "Scale-out"):
#   the teacher OpenThinker3-7B behind `opdkit serve-teacher`, one server per teacher GPU;
#   the student Qwen2.5-7B-Instruct FSDP-sharded over the other GPUs, each process sampling with its own
#   in-process vLLM engine.
# NOT RUN on this project's machines (no GPUs); every command below is one opdkit documents and tests on CPU.
#
# One node (default: GPUs 0-5 student, 6-7 teacher):
#   TEACHER=/models/OpenThinker3-7B bash scripts/launch_qwen7b.sh [a.b=value ...]
# Several nodes: run the teacher servers on their own node (TEACHER_ONLY=1 HOST=0.0.0.0 on it, with a
# TOKEN_FILE), then on each student node:
#   NNODES=2 NODE_RANK=0|1 MASTER_ADDR=node0 STUDENT_GPUS=0,1,2,3,4,5,6,7 TEACHER_GPUS= \
#   TEACHER_URLS=http://teacher-node:8000,http://teacher-node:8001,... TOKEN_FILE=~/.opdkit-token \
#   bash scripts/launch_qwen7b.sh
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=${CONFIG:-configs/math_qwen7b_scaleout.yaml}
TEACHER=${TEACHER:-/models/OpenThinker3-7B}
STUDENT_GPUS=${STUDENT_GPUS-0,1,2,3,4,5}
TEACHER_GPUS=${TEACHER_GPUS-6,7}
BASE_PORT=${BASE_PORT:-8000}
HOST=${HOST:-127.0.0.1}
TOKEN_FILE=${TOKEN_FILE:-}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
OPDKIT=${OPDKIT:-opdkit}
LOGS=${LOGS:-runs/launch-logs}
mkdir -p "$LOGS"

pids=()
cleanup() { for p in "${pids[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# 1. teacher servers: one per teacher GPU, ports BASE_PORT, BASE_PORT+1, ...
urls=()
if [ -n "$TEACHER_GPUS" ]; then
    i=0
    for gpu in ${TEACHER_GPUS//,/ }; do
        port=$((BASE_PORT + i))
        auth=()
        [ -n "$TOKEN_FILE" ] && auth=(--token-file "$TOKEN_FILE")
        CUDA_VISIBLE_DEVICES=$gpu "$OPDKIT" serve-teacher --model "$TEACHER" --dtype bfloat16 --device cuda \
            --host "$HOST" --port "$port" --max-sequences 22 --batch-sequences 22 --max-seq-len 17408 \
            "${auth[@]}" \
            > "$LOGS/teacher-$gpu.log" 2>&1 &
        pids+=($!)
        urls+=("http://127.0.0.1:$port")
        i=$((i + 1))
    done
    # wait for every server's /health (loading 7B weights takes a minute or two)
    for u in "${urls[@]}"; do
        hdr=()
        [ -n "$TOKEN_FILE" ] && hdr=(-H "Authorization: Bearer $(cat "$TOKEN_FILE")")
        for _ in $(seq 1 600); do
            curl -sf "${hdr[@]}" "$u/health" > /dev/null && break
            sleep 1
        done
        curl -sf "${hdr[@]}" "$u/health" > /dev/null || { echo "teacher server $u did not start; see $LOGS"; exit 1; }
        echo "teacher server ready: $u"
    done
fi
if [ -n "${TEACHER_ONLY:-}" ]; then
    echo "teacher servers running (Ctrl-C stops them)"; wait; exit 0
fi
TEACHER_URLS=${TEACHER_URLS:-$(IFS=,; echo "${urls[*]}")}

# 2. the student: FSDP over the student GPUs of every node, one vLLM engine per process
nproc=$(echo "$STUDENT_GPUS" | tr ',' '\n' | grep -c .)
extra=()
[ -n "$TOKEN_FILE" ] && extra+=("teacher.token_file=$TOKEN_FILE")
CUDA_VISIBLE_DEVICES=$STUDENT_GPUS accelerate launch \
    --num_machines "$NNODES" --machine_rank "$NODE_RANK" --main_process_ip "$MASTER_ADDR" \
    --main_process_port "$MASTER_PORT" --num_processes $((nproc * NNODES)) \
    --use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP \
    -m opdkit.cli train "$CONFIG" "teacher.url=$TEACHER_URLS" "${extra[@]}" "$@"
