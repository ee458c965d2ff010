#!/usr/bin/env bash
# The skill stages of the tiny brain on a GPU, with more batches than the CPU gives them, from pretrained
# checkpoints made elsewhere (e.g. copied from the CPU):
#   bash benchmarks/gpu_skill_checks.sh IMAGE_CKPT TEXT_CKPT [OUT_DIR]
# the data benchmark (each stage 200 batches with its scenes drawn inline and in 4 worker processes), then QA
# tutorial (3 min), imitation (2.5 min), line trick (1.5 min); each prints its evaluations into OUT_DIR.
set -u
img=$1
txt=$2
out=${3:-runs/gpu_skills}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
common=(--gpu 0 --init-from "$img" "$txt" --seq-len 40)
keep() { grep -E " eval |finished|error|Error|Traceback|batch [0-9]*0{2}/" | cut -c1-1500; }
rm -rf /tmp/gpu_qa /tmp/gpu_imitation /tmp/gpu_line
timeout 400 python3 benchmarks/bench_stage_data.py --init-from "$img" "$txt" --workers 0 4 --steps 200 --gpu 0 \
    --seq-len 40 2>&1 | tee "$out/stage_data.txt"
timeout 260 python3 tutorial_qa.py --run-dir /tmp/gpu_qa "${common[@]}" --steps 4000 --time-limit 3 \
    --eval-every 500 --save-every 500 --eval-scenes 50 2>&1 | keep | tee "$out/qa.txt"
timeout 220 python3 rl_fake_traces.py --run-dir /tmp/gpu_imitation "${common[@]}" --steps 4000 --time-limit 2.5 \
    --eval-every 500 --save-every 500 --eval-scenes 64 --eval-offsets 0.1 0.3 0.5 2>&1 | keep | tee "$out/imitation.txt"
timeout 130 python3 trick_line.py --run-dir /tmp/gpu_line "${common[@]}" --steps 4000 --time-limit 1.5 \
    --eval-every 1000 --save-every 1000 2>&1 | keep | tee "$out/line.txt"
cp /tmp/gpu_line/lines.png "$out/" 2>/dev/null
