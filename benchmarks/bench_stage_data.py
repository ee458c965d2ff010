"""Benchmark of the skill stages' data: the share of each batch spent making data, and samples/s, with the
scenes drawn in the training process (--workers 0) and ahead in worker processes.

    python benchmarks/bench_stage_data.py --init-from IMAGE.pt TEXT.pt                    # CPU: workers 0 and 1
    python benchmarks/bench_stage_data.py --init-from IMAGE.pt TEXT.pt --workers 0 4 --device cuda --steps 200

Runs each stage (trick_line, tutorial_qa, rl_fake_traces) for --steps batches from the pretrained checkpoints,
once per --workers value, in a temporary folder, and prints a table from its metrics.jsonl: the last log
interval's data_share (time in the stage's `run.timing("data")` block: drawing scenes, rendering them,
tokenizing, the oracle's traces and the brain's own episodes) and samples/s. Not a test. Every other flag
goes to every stage (e.g. --img-size 144 --patch 18 for 144 px checkpoints).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
STAGES = ["trick_line.py", "tutorial_qa.py", "rl_fake_traces.py"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init-from", nargs=2, required=True, metavar=("IMAGE", "TEXT"),
                        help="image and text pretraining checkpoints")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="--workers values to compare")
    parser.add_argument("--steps", type=int, default=40, help="batches a run; the table reads the second half")
    parser.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES, help="the stages to run")
    args, extra = parser.parse_known_args()
    for path in args.init_from:
        if not os.path.isfile(path):
            parser.error(f"--init-from: no file {path}")
    half = max(1, args.steps // 2)
    print(f"{'stage':18s} {'workers':>7s} {'data share':>10s} {'samples/s':>10s} {'wall s':>7s}")
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages:
            for workers in args.workers:
                run_dir = os.path.join(tmp, f"{stage[:-3]}_{workers}")
                cmd = [sys.executable, os.path.join(ROOT, stage), "--run-dir", run_dir, "--steps", str(args.steps),
                       "--log-every", str(half), "--eval-every", str(10 ** 9), "--save-every", str(10 ** 9),
                       "--eval-scenes", "4", "--eval-frames", "8", "--replay-sentences", "64",
                       "--workers", str(workers), "--init-from", *args.init_from, *extra]
                t = time.time()
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"{stage} failed:\n{done.stderr[-2000:]}")
                with open(os.path.join(run_dir, "metrics.jsonl")) as f:
                    last = [r for r in map(json.loads, f) if r["kind"] == "train"][-1]
                print(f"{stage[:-3]:18s} {workers:7d} {last.get('data_share', 0):10.1%} "
                      f"{last['samples_per_s']:10.1f} {time.time() - t:7.0f}", flush=True)


if __name__ == "__main__":
    main()
