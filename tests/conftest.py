"""Shared helpers for tests that run the stage scripts as real processes."""
import os
import signal
import subprocess
import sys

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # `pytest -n 2`: two workers share the two cores, one torch thread each


def pytest_collection_modifyitems(items):
    """The tests marked slow (the longest) first, so that under `-n 2` the two workers finish together
    instead of one running the longest test alone at the end; `-m "not slow"` leaves them out."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A brain small enough for CI: every stage test overrides the tiny preset's sizes with these.
SMALL_ARGS = ["--img-size", "32", "--patch", "8", "--width", "32", "--img-heads", "2", "--text-heads", "2",
              "--value-heads", "2", "--vocab", "300", "--device", "cpu"]


def script_env():
    """The environment of a script under test: the project on the path, one thread (CI has 2 cores)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


def run_script(script, *args, check=True, timeout=300):
    """Run a project script to completion; returns the CompletedProcess (stdout, stderr as text)."""
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=check, timeout=timeout, env=script_env())


def kill_when(script, pattern, *args, sig=signal.SIGKILL):
    """Start a script, send it `sig` once a line containing `pattern` is printed; returns (exit code, output)."""
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=script_env())
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if pattern in line:
            proc.send_signal(sig)
            break
    seen.append(proc.stdout.read())
    return proc.wait(), "".join(seen)


def payload(brain, stage="toy", batch=1, trained=("img_enc", "img_dec"), tokenizer=None):
    """What a stage's checkpoint holds, for a brain made in a test (Keeper.save or torch.save writes it)."""
    import dataclasses
    import core
    return {"format": core.FORMAT, "stage": stage, "batch": batch, "config": dataclasses.asdict(brain.cfg),
            "model": brain.state_dict(), "trained_parts": list(trained), "tokenizer": tokenizer}
