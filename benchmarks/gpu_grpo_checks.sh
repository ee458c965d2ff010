#!/usr/bin/env bash
# GRPO of the tiny brain on one GPU with rounds eight times the CPU's (64 start scenes x 8 plays), from
# brains trained elsewhere (e.g. on the CPU), three runs side by side on the one GPU:
#   bash benchmarks/gpu_grpo_checks.sh GRPO_CKPT IMITATION_CKPT [OUT_DIR] [MINUTES]
#   a: from GRPO_CKPT, the default rate and epochs    b: from IMITATION_CKPT, the same
#   c: from GRPO_CKPT, --epochs 4 (twice the optimizer steps a round)
# Each evaluates greedy and sampled success at offsets 0.3 and 0.5 on 200 held-out scenes every 8 rounds
# and at its end; the logs of the evaluations and rounds, and each run's best brain, go to OUT_DIR.
set -u
grpo=$1
imitation=$2
out=${3:-runs/gpu_grpo}
minutes=${4:-6.5}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
common=(--gpu 0 --steps 60 --batch-size 64 --offset-start 0.3 --offset-max 0.3 --eval-every 8 --save-every 8
        --eval-scenes 200 --eval-offsets 0.3 0.5 --time-limit "$minutes")
keep() { grep -E " eval | batch [0-9]+/|finished|error|Error|Traceback" | cut -c1-2500; }
rm -rf /tmp/gpu_grpo_a /tmp/gpu_grpo_b /tmp/gpu_grpo_c
limit=$(python3 -c "print(int($minutes * 60 + 150))")
timeout "$limit" python3 rl_grpo.py --run-dir /tmp/gpu_grpo_a --init-from "$grpo" "${common[@]}" 2>&1 | keep > "$out/a.txt" &
timeout "$limit" python3 rl_grpo.py --run-dir /tmp/gpu_grpo_b --init-from "$imitation" "${common[@]}" 2>&1 | keep > "$out/b.txt" &
timeout "$limit" python3 rl_grpo.py --run-dir /tmp/gpu_grpo_c --init-from "$grpo" "${common[@]}" --epochs 4 2>&1 | keep > "$out/c.txt" &
wait
for r in a b c; do    # each run's best brain, weights only (no optimizer state), to look at elsewhere
    python3 -c "import sys, torch, core; c = core.load_checkpoint(sys.argv[1])
for k in core.RESUME_ONLY: c.pop(k, None)
torch.save(c, sys.argv[2])" "/tmp/gpu_grpo_$r/rl_grpo_best.pt" "$out/best_$r.pt" 2>/dev/null
done
nvidia-smi --query-gpu=memory.used --format=csv,noheader >> "$out/gpu.txt"
tail -n 3 "$out"/a.txt "$out"/b.txt "$out"/c.txt | cut -c1-600
