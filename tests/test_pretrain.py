"""The two pretraining stages as a user runs them: a few steps of a small brain, checkpoints, exact resume."""
import glob
import os
import signal
import subprocess
import sys

import pytest
import torch

import core
from conftest import ROOT, SMALL_ARGS, kill_when, run_script, script_env

SENTENCES = [f"The {a} {b} is {c} the {d}." for a in ("red", "green", "small", "old") for b in ("cat", "gold", "wall", "agent")
             for c in ("near", "left of", "above", "behind") for d in ("door", "tree", "wall")]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(SENTENCES) + "\n")
    return path


def stage_args(stage, run_dir, steps, extra):
    common = [*SMALL_ARGS, "--run-dir", run_dir, "--steps", steps, "--batch-size", 8, "--log-every", 2,
              "--save-every", 4, "--eval-every", 6, "--warmup", 2]
    if stage == "pretrain_image.py":
        return common + ["--eval-frames", 8] + extra
    return common + ["--samples", 1] + extra


def weights(run_dir):
    return core.load_checkpoint(core.resolve_checkpoint(str(run_dir)))["model"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pretrain_image.py", "pretrain_text.py"])
def test_a_few_steps_write_checkpoints_named_by_batch_and_a_killed_run_resumes_exactly(stage, tmp_path, corpus):
    extra = ["--corpus", corpus] if stage == "pretrain_text.py" else []
    out = run_script(stage, *stage_args(stage, tmp_path / "a", 24, extra)).stdout
    names = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "a" / "*_batch*.pt")))
    prefix = stage[:-3]
    assert names and all(n.startswith(prefix + "_") for n in names) and names[-1].endswith("_batch00000024.pt")
    assert os.path.exists(tmp_path / "a" / f"{prefix}_best.pt")
    assert "eval" in out and ("recovered_gold" in out if "image" in stage else "perplexity" in out)

    code, _ = kill_when(stage, "batch 10/24", *stage_args(stage, tmp_path / "b", 24, extra))
    assert code == -signal.SIGKILL
    assert core.load_checkpoint(core.resolve_checkpoint(str(tmp_path / "b")))["batch"] < 24
    out = run_script(stage, *stage_args(stage, tmp_path / "b", 24, extra + ["--resume"])).stdout
    assert "resuming from" in out
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_image_stage_writes_a_reconstruction_grid(tmp_path):
    run_script("pretrain_image.py", *stage_args("pretrain_image.py", tmp_path, 6, []))
    from PIL import Image
    grid = Image.open(tmp_path / "reconstructions.png")
    assert grid.width == 8 * 32 * 2 and grid.height == 2 * 32 * 2     # 8 frames, input above reconstruction


def test_text_stage_trains_its_tokenizer_once_and_it_travels(tmp_path, corpus):
    out = run_script("pretrain_text.py", *stage_args("pretrain_text.py", tmp_path, 6, ["--corpus", corpus])).stdout
    assert "trained a byte-level BPE tokenizer" in out
    ckpt = core.load_checkpoint(core.resolve_checkpoint(str(tmp_path)))
    tok = core.Tokenizer.from_json(ckpt["tokenizer"])
    assert tok.decode(tok.encode([SENTENCES[0]], 32)[0]) == SENTENCES[0]
    # the stage evaluates (and chooses its best) on the validation half of its held-out sentences, not on the
    # test half that eval.py reports
    brain = core.load_brain(core.resolve_checkpoint(str(tmp_path)))[0]
    val, test = (tok.encode(core.heldout_sentences(ckpt["heldout_text"], split), 32) for split in ("val", "test"))
    assert len(val) == len(test) == 2 and "2 validation, 2 test" in out
    assert ckpt["metrics"]["heldout_loss"] == pytest.approx(core.sentence_loss(brain, val), rel=1e-5)
    assert ckpt["metrics"]["heldout_loss"] != pytest.approx(core.sentence_loss(brain, test), rel=1e-5)
    out = run_script("pretrain_text.py", *stage_args("pretrain_text.py", tmp_path, 8, ["--corpus", corpus, "--resume"])).stdout
    assert "trained a byte-level BPE tokenizer" not in out
    assert core.load_checkpoint(core.resolve_checkpoint(str(tmp_path)))["tokenizer"] == ckpt["tokenizer"]


def test_bad_corpus_input_gives_clear_errors(tmp_path):
    missing = run_script("pretrain_text.py", *stage_args("pretrain_text.py", tmp_path / "r1", 2,
                                                         ["--corpus", tmp_path / "nope.txt"]), check=False)
    assert missing.returncode == 2 and "nope.txt" in missing.stderr and "Traceback" not in missing.stderr
    (tmp_path / "empty.txt").write_text("\n\n")
    empty = run_script("pretrain_text.py", *stage_args("pretrain_text.py", tmp_path / "r2", 2,
                                                       ["--corpus", tmp_path / "empty.txt"]), check=False)
    assert empty.returncode == 2 and "empty.txt" in empty.stderr and "Traceback" not in empty.stderr
    bad = tmp_path / "sentences.csv"
    lines = [f"{i}\teng\t{s}" for i, s in enumerate(SENTENCES)] + ["oops no tabs", "12\tfra\tBonjour.", "x\teng\tBad id."]
    bad.write_bytes(("\n".join(lines) + "\n").encode() + b"99\teng\tCaf\xe9 latin-1.\n")
    ok = run_script("pretrain_text.py", *stage_args("pretrain_text.py", tmp_path / "r3", 2, ["--corpus", bad]))
    assert "malformed" in ok.stdout and "non-UTF-8" in ok.stdout


def test_a_run_folder_of_another_stage_is_refused(tmp_path, corpus):
    run_script("pretrain_image.py", *stage_args("pretrain_image.py", tmp_path, 2, []))
    other = run_script("pretrain_text.py", *stage_args("pretrain_text.py", tmp_path, 2, ["--corpus", corpus]), check=False)
    assert other.returncode == 2 and "another stage" in other.stderr
    assert len(glob.glob(str(tmp_path / "pretrain_image_*batch*.pt"))) == 1      # nothing was touched


def test_image_data_workers_draw_exactly_the_same_batches(tmp_path):
    run_script("pretrain_image.py", *stage_args("pretrain_image.py", tmp_path / "inline", 4, ["--workers", 0]))
    run_script("pretrain_image.py", *stage_args("pretrain_image.py", tmp_path / "workers", 4, ["--workers", 2]))
    a, b = weights(tmp_path / "inline"), weights(tmp_path / "workers")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ctrl_c_with_data_workers_saves_and_stops_cleanly(tmp_path):
    """Ctrl-C in a terminal signals the whole process group, data workers too: they ignore it, the stage saves
    after its batch and stops (a worker killed mid-batch printed a traceback, and could leave the stage waiting)."""
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_image.py"),
           *map(str, stage_args("pretrain_image.py", tmp_path, 400, ["--workers", 1, "--log-every", 1]))]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=script_env(), start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "batch 3/400" in line:
            os.killpg(proc.pid, signal.SIGINT)
            break
    out, _ = proc.communicate(timeout=120)
    out = "".join(seen) + out
    assert proc.returncode == 0 and "stopped by SIGINT" in out and "Traceback" not in out
    assert core.parse_checkpoint_name(core.latest_checkpoint(str(tmp_path))[0])[1] < 400
