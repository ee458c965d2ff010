#!/usr/bin/env bash
# The GPU checks behind the README's GPU figures, in one short run:
#   bash benchmarks/gpu_checks.sh [OUT_DIR] [PRETRAIN_MINUTES]
# the game benchmark on CUDA; base brain training steps (fp32, bf16, bf16 + compile) and policy rollouts;
# a fixed budget of base image pretraining (held-out MSE reached, data frames/s against training samples/s).
set -u
out=${1:-${OUT:-runs/gpu_checks}}
minutes=${2:-5}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
timeout 60 python3 benchmarks/bench_game.py --device cuda --seconds 0.3 --threads 1 2>&1 | tee "$out/bench_game.txt"
timeout 120 python3 benchmarks/bench_brain.py --preset base --device cuda --batch-size 32 --iters 5 \
    --modes fp32 bf16 bf16+compile --rollout-games 256 2>&1 | tee "$out/bench_brain.txt"
rm -rf /tmp/gpu_image
timeout $((minutes * 60 + 60)) python3 pretrain_image.py --preset base --gpu 0 --amp bf16 --batch-size 64 \
    --steps 4000 --time-limit "$minutes" --lr 5e-4 --warmup 100 --eval-every 250 --eval-frames 128 --log-every 25 \
    --run-dir /tmp/gpu_image 2>&1 | grep -v ' config ' | tee "$out/pretrain_image_base.txt"
cp /tmp/gpu_image/reconstructions.png "$out/" 2>/dev/null
