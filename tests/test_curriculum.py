"""The whole curriculum as a user runs it (curriculum.sh --quick, killed and run again), and eval.py on
checkpoints that lack skills, side by side, and on files that are not checkpoints."""
import argparse
import dataclasses
import importlib
import json
import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import core
from conftest import ROOT, run_script, script_env

SKILLS = ("image", "text", "line", "qa", "agent")
STAGES = ("image", "text", "line", "qa", "turn", "imitation", "grpo")


def curriculum(out, *args):
    """Start curriculum.sh --quick on folder `out` (its own output goes to out/curriculum.log)."""
    return subprocess.Popen(["bash", os.path.join(ROOT, "curriculum.sh"), "--quick", "--out-dir", str(out), *args],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**script_env(), "PYTHON": sys.executable})


def report_rows(path):
    """{(skill, figure): [cell per checkpoint]} from report.md's table."""
    rows = {}
    for line in open(path):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in (*SKILLS, "forgetting"):
            rows[cells[0], cells[1]] = cells[2:]
    return rows


def wait_for(paths, proc, timeout=300):
    """Wait until every path exists (a stage has started: its Run made the folder's train.log), then a little
    more. A stage signalled before that (still importing torch) stops with nothing to save and no log."""
    deadline = time.time() + timeout
    while not all(path.exists() for path in paths):
        missing = [str(path) for path in paths if not path.exists()]
        assert proc_alive(proc) and time.time() < deadline, f"{missing} never appeared"
        time.sleep(0.05)
    time.sleep(0.5)


def proc_alive(proc):
    return proc.poll() is None if hasattr(proc, "poll") else os.waitpid(proc, os.WNOHANG) == (0, 0)


def ctrl_c_in_a_terminal(out, stage):
    """Run curriculum.sh --quick in a terminal and press Ctrl-C once `stage` has started; returns its exit code."""
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(ROOT)
        # as from a fresh terminal: Ctrl-C's signal neither ignored nor blocked (a shell keeps an ignored one
        # ignored, and this process may have inherited either from whatever started the tests)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execvpe("bash", ["bash", "curriculum.sh", "--quick", "--out-dir", str(out)],
                   {**script_env(), "PYTHON": sys.executable})
    threading.Thread(target=_drain, args=(fd,), daemon=True).start()     # the script never blocks on its terminal
    wait_for([out / stage / "train.log"], pid)
    os.write(fd, b"\x03")
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _drain(fd):
    try:
        while os.read(fd, 65536):
            pass
    except OSError:                      # the terminal closed: the script ended
        pass


@pytest.mark.slow
def test_quick_curriculum_stopped_twice_and_run_again_teaches_every_skill_and_reports_it(tmp_path):
    out = tmp_path / "curriculum"
    # `kill` (SIGTERM) while image and text pretraining run side by side: both save a checkpoint and stop
    first = curriculum(out)
    wait_for([out / "image" / "train.log", out / "text" / "train.log"], first)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) != 0
    assert not (out / "text" / "finished.json").exists()
    assert list((out / "text").glob("pretrain_text_*_batch*.pt"))
    image_done = (out / "image" / "finished.json").exists()
    assert image_done or "stopped by SIGTERM" in open(out / "image" / "train.log").read()
    start = open(out / "curriculum.log").read()
    assert start.index("stage text:") < start.index("stage image finished" if image_done else "SIGTERM received")
    # Ctrl-C in a terminal while the line trick runs: the same, though the terminal signals the whole group
    assert ctrl_c_in_a_terminal(out, "line") != 0
    assert (out / "text" / "finished.json").exists() and not (out / "line" / "finished.json").exists()
    assert "stopped by SIGTERM" in open(out / "line" / "train.log").read()

    again = curriculum(out)
    log = again.communicate(timeout=600)[0]
    assert again.returncode == 0, open(out / "curriculum.log").read()[-4000:]
    assert "skip image" in log and "skip text" in log
    assert re.search(r"stage line: .*trick_line\.py .*--resume", log)
    assert "resuming from" in open(out / "text" / "train.log").read()
    assert "resuming from" in open(out / "line" / "train.log").read()
    assert all((out / s / "finished.json").exists() for s in STAGES)
    assert "Traceback" not in open(out / "curriculum.log").read()
    for stage in ("imitation", "grpo"):           # the agent stages keep the QA tutorial's questions
        stage_log = open(out / stage / "train.log").read()
        assert "its questions are replayed" in stage_log and "qa_forced_mean" in stage_log, stage
    for stage in ("qa", "imitation", "grpo"):     # and the stages after the line trick keep the line (into
        stage_log = open(out / stage / "train.log").read()      # img_dec, which they all train) and measure it
        assert "the line trick: it is replayed" in stage_log and "line_iou_kept" in stage_log, stage

    report = out / "report" / "report.md"
    assert f"report: {out}/report/report.md" in log
    rows = report_rows(report)
    final = {skill: [cells[-1] for (s, _), cells in rows.items() if s == skill] for skill in SKILLS}
    for skill in SKILLS:                          # the final brain was trained for every skill, and measured
        assert final[skill] and "not trained" not in final[skill], (skill, final[skill])
    phrasings = core.QA_FAMILIES["agent_above_below"]["questions"]["heldout"]      # QA by phrasing, too
    assert all(("qa", f'accuracy: agent_above_below, "{q}"') in rows for q in phrasings)
    assert ("qa", "answered in another family's words: turn") in rows
    oracles = [float(rows["agent", f"success @0.3: baseline oracle{kind}"][-1].rstrip("%"))
               for kind in ("", ", backward allowed")]          # both oracles beside the agent, on its scenes
    assert oracles[1] >= oracles[0] > 50, oracles
    first_column = {s: cells[0] for (s, _), cells in rows.items()}
    assert first_column["image"] != "not trained" and first_column["text"] == "not trained"    # image pretraining
    for name in ("reconstructions", "lines", "qa", "trajectories", "curves"):
        assert (out / "report" / f"6_rl_grpo_{name}.png").stat().st_size > 1000, name
    turn = open(out / "turn" / "train.log").read()          # the turn phase: turn asked alone, the others kept
    assert "asked_turn 1" in turn and '"trains": ["reader"]' in turn and "acc_near " in turn

    # a third run finds every stage finished and only writes the report again
    third = curriculum(out)
    log = third.communicate(timeout=300)[0]
    assert third.returncode == 0 and all(f"skip {s}" in log for s in STAGES)


def small_checkpoint(path, stage, skills, tokenizer=None, heldout=None):
    """A checkpoint of an untrained small brain, as a stage writes it, listing the skills it claims."""
    torch.manual_seed(0)
    cfg = core.make_config("tiny", img_size=32, patch=8, width=32, img_heads=2, text_heads=2, value_heads=2,
                           vocab=tokenizer.vocab if tokenizer else 300)
    brain = core.Brain(cfg)
    core.atomic_save({"format": core.FORMAT, "stage": stage, "batch": 5, "config": dataclasses.asdict(cfg),
                      "model": brain.state_dict(), "tokenizer": tokenizer.to_json() if tokenizer else None,
                      "skills": skills, "heldout_text": heldout, "metrics": {}, "args": {}}, str(path))
    return path


def test_eval_reports_skills_a_checkpoint_lacks_as_not_trained_and_puts_two_side_by_side(tmp_path):
    sentences = [f"The {a} {b} is near the {c}." for a in ("red", "old") for b in ("cat", "gold") for c in ("door", "wall")]
    tokenizer = core.Tokenizer.train(sentences, 300)
    image = small_checkpoint(tmp_path / "image.pt", "pretrain_image", ["image"])
    text = small_checkpoint(tmp_path / "text.pt", "pretrain_text", ["text"], tokenizer, sentences[:4])
    out = run_script("eval.py", image, text, "--quick", "--device", "cpu", "--out", tmp_path / "report").stdout
    assert f"report: {tmp_path / 'report' / 'report.md'}" in out
    rows = report_rows(tmp_path / "report" / "report.md")
    assert rows["image", "held-out MSE"][1] == "not trained" and float(rows["image", "held-out MSE"][0]) > 0
    name, loss = next((name, cells) for (s, name), cells in rows.items() if s == "text" and name.startswith("held-out loss"))
    assert loss[0] == "not trained" and float(loss[1]) > 0
    brain = core.load_brain(str(text))[0]
    test = tokenizer.encode(core.heldout_sentences(sentences[:4], "test"), brain.cfg.seq_len)   # the test half
    assert name == "held-out loss (nats/token, 2 test sentences)"
    assert float(loss[1]) == pytest.approx(core.sentence_loss(brain, test), rel=1e-3)
    for skill in ("line", "qa", "agent"):
        assert [cells for (s, _), cells in rows.items() if s == skill] == [["not trained", "not trained"]]
    assert (tmp_path / "report" / "1_pretrain_image_reconstructions.png").exists()
    assert not (tmp_path / "report" / "2_pretrain_text_reconstructions.png").exists()


def test_eval_measures_on_the_split_it_is_asked_for(tmp_path):
    """--split val measures on the stages' held-out data (to set a report beside their logs), test by default;
    --agent-scenes (like --qa-scenes, --line-scenes) sizes a held-out set; report.json holds the figures unrounded."""
    sentences = [f"The {a} {b} is near the {c}." for a in ("red", "old") for b in ("cat", "gold") for c in ("door", "wall")]
    tokenizer = core.Tokenizer.train(sentences, 300)
    ckpt = small_checkpoint(tmp_path / "agent.pt", "rl_grpo", ["text", "agent"], tokenizer, sentences[:6])
    brain = core.load_brain(str(ckpt))[0]
    for split, n, extra in (("test", 16, []), ("val", 12, ["--split", "val", "--agent-scenes", 12])):
        out = tmp_path / split
        run_script("eval.py", ckpt, "--quick", "--device", "cpu", "--out", out, *extra)
        assert "the %s split" % split in open(out / "report.md").read()
        report = json.load(open(out / "report.json"))          # the same figures, unrounded, for scripts
        assert report["split"] == split and [c["checkpoint"] for c in report["checkpoints"]] == [str(ckpt)]
        assert report["sizes"]["agent_scenes"] == n and f"{n} agent scenes per offset" in open(out / "report.md").read()
        figures = report["checkpoints"][0]["figures"]
        assert figures["image"] is None and set(figures) == {"image", "text", "line", "qa", "agent", "forgetting"}
        rows = {name: value for skill in ("text", "agent") for name, value in figures[skill].items()}
        table = report_rows(out / "report.md")
        assert table["agent", "success @0.3: baseline oracle"] == [f"{rows['success @0.3: baseline oracle']:.1%}"]
        held = core.heldout_sentences(sentences[:6], split)
        assert rows[f"held-out loss (nats/token, 3 {split} sentences)"] == pytest.approx(
            core.sentence_loss(brain, tokenizer.encode(held, brain.cfg.seq_len)), rel=1e-5)
        m = core.evaluate_agent(None, brain.cfg.img_size, "cpu", (0.1, 0.3), n, split=split)   # the baselines
        for offset in (0.1, 0.3):
            assert rows[f"actions to gold @{offset}: oracle"] == pytest.approx(m[f"oracle_actions@{offset}"])
            assert rows[f"success @{offset}: baseline random"] == m[f"random_success@{offset}"]
    bad = run_script("eval.py", ckpt, "--split", "train", check=False)
    assert bad.returncode == 2 and "invalid choice: 'train'" in bad.stdout + bad.stderr


def test_eval_says_clearly_what_is_wrong_with_a_checkpoint(tmp_path):
    missing = run_script("eval.py", tmp_path / "nope.pt", "--out", tmp_path / "r", check=False)
    assert missing.returncode == 2 and "nope.pt" in missing.stderr and "Traceback" not in missing.stderr
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    junk = run_script("eval.py", tmp_path / "junk.pt", "--out", tmp_path / "r", check=False)
    assert junk.returncode == 2 and "junk.pt" in junk.stderr and "Traceback" not in junk.stderr
    empty = run_script("eval.py", tmp_path, "--out", tmp_path / "r", check=False)       # a folder with no checkpoint
    assert empty.returncode == 2 and "no valid checkpoint" in empty.stderr


class _Parsed(Exception):
    """Raised by a stage's parse_args once it has accepted the command line (so the stage never runs)."""


def stage_args(script, argv, monkeypatch):
    """The namespace `script`'s main() builds from argv, without running the stage; a flag it does not know
    fails the test as argparse's error."""
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        raise _Parsed(parse(parser, args, namespace))
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    module = importlib.import_module(script.removesuffix(".py"))
    try:
        module.main(argv)
    except _Parsed as parsed:
        return parsed.args[0]
    raise AssertionError(f"{script} never parsed its arguments")


def curriculum_sh(*args):
    """Run curriculum.sh to its end with these arguments: (exit code, stdout, stderr)."""
    result = subprocess.run(["bash", os.path.join(ROOT, "curriculum.sh"), *args],
                            cwd=ROOT, capture_output=True, text=True, env={**script_env(), "PYTHON": "python"})
    return result.returncode, result.stdout, result.stderr


def dry_run(out, *args):
    return curriculum_sh("--dry-run", "--out-dir", str(out), *args)


def test_dry_run_prints_every_stage_and_every_mode_has_flags_its_stage_accepts(tmp_path, monkeypatch):
    out = tmp_path / "long"
    for mode in ("", "--quick", "--long"):
        code, printed, err = dry_run(out, *filter(None, [mode]), "--img-size", "144", "--patch", "18")
        assert code == 0, err
        lines = printed.splitlines()
        assert [line.split(":")[0] for line in lines] == list(STAGES)
        parsed = {}
        for line in lines:
            key, command = line.split(": ", 1)
            python, script, *argv = command.split()
            args = parsed[key] = stage_args(script, argv, monkeypatch)
            assert args.run_dir == str(out / key)
            assert (args.img_size, args.patch) == (144, 18), line       # the pass-through flags come last: they win
            if mode == "--long":                 # no minute caps, and every part of the agent trains
                assert not args.time_limit, line
                assert not (key in ("imitation", "grpo") and args.freeze), line
        if mode == "--long":
            imitation = parsed["imitation"]
            assert imitation.steps == 1500 and imitation.init_from == [str(out / p / "best") for p in ("text", "qa", "turn")]
    assert not out.exists(), "a dry run made the folder"

    (out / "qa").mkdir(parents=True)                         # a stage with a checkpoint would resume
    (out / "qa" / "tutorial_qa_20261127T000000000Z_batch00000300.pt").write_bytes(b"")
    code, printed, _ = dry_run(out, "--long")
    assert code == 0 and [line.split(":")[0] for line in printed.splitlines() if "--resume" in line] == ["qa"]

    code, shown, _ = curriculum_sh("--help")
    assert code == 0 and all(flag in shown for flag in ("--quick", "--long", "--dry-run", "--jobs"))
    assert shown.rstrip().endswith("is rewritten.") and "set -e" not in shown     # the whole header

    code, printed, err = dry_run(out, "--long", "--preset", "base")
    assert code == 2 and printed == "" and "--long" in err and "--preset base" in err and "Traceback" not in err
