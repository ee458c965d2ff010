"""The RL stages by example: the brain as a policy, oracle traces, GRPO's advantages, resume, flat memory."""
import importlib.util
import json
import os
import re
import signal

import numpy as np
import pytest
import torch

import core
import game
import rl_grpo
from conftest import ROOT, SMALL_ARGS, kill_when, payload, run_script
from pretrained import pretrain

SMALL = dict(img_size=32, patch=8, width=32, img_heads=2, text_heads=2, value_heads=2, vocab=300)


def small_brain(seed=0):
    torch.manual_seed(seed)
    return core.Brain(core.make_config("tiny", **SMALL))


def test_scoring_a_rollout_gives_the_probabilities_the_policy_sampled_it_with():
    brain = small_brain()
    scenes = [game.random_bare_settings(i, max_agent_offset=0.2) for i in range(12)]
    played = core.rollout(scenes, "sample", 32, "cpu", brain=brain, generator=torch.Generator().manual_seed(0))
    states, episode, step = played.flat()
    logp, _ = core.score_actions(brain, states, played.text[episode], step, 32)
    assert torch.allclose(logp, played.logprobs[episode, step], atol=1e-5)
    assert len(step) == played.steps.sum()
    # each step's token is an action or </s>, and nothing is written after the episode ends
    for b in range(12):
        n = played.steps[b].item()
        assert set(played.text[b, 1: n + 1].tolist()) <= set(core.POLICY_TOKENS)
        assert (played.text[b, n + 1:] == core.PAD).all()


def test_exploring_episodes_take_random_moves_in_the_given_share():
    """DAgger's episodes with --explore: a greedy brain's moves, a share of them swapped for random ones."""
    brain = small_brain()
    scenes = [game.random_bare_settings(i, max_agent_offset=0.5) for i in range(128)]
    moves = lambda explore: core.rollout(scenes, "greedy", 32, "cpu", max_actions=8, brain=brain, explore=explore,
                                         generator=torch.Generator().manual_seed(0)).text[:, 1:9]
    greedy, half, every = moves(0.0), moves(0.5), moves(1.0)
    assert torch.equal(greedy, moves(0.0))
    kinds = lambda t: torch.stack([(t == tok).sum() for tok in core.POLICY_TOKENS[:4]]).float()
    assert (kinds(every) / kinds(every).sum() - 0.25).abs().max() < 0.07      # uniform over the four moves
    differs = (half != greedy)[:, 0].float().mean()                            # first move: same state
    assert 0.25 < differs < 0.65        # swapped in half of the steps; a random move differs from the
                                        # greedy one 3 times in 4 (always, where the greedy one ends the game)


def test_oracle_traces_store_the_states_they_really_went_through():
    scenes = [game.random_bare_settings(i, max_agent_offset=0.3) for i in range(8)]
    trace = core.rollout(scenes, "oracle", 32, "cpu")
    assert trace.success.float().mean() >= 0.75
    states, episode, step = trace.flat()
    frames = game.render(states, 96)
    for b in range(8):
        mine = (episode == b).nonzero().squeeze(1)
        assert all(states[mine[i]] != states[mine[i + 1]] for i in range(len(mine) - 1))   # every action acted
        changed = [not torch.equal(frames[mine[i]], frames[mine[i + 1]]) for i in range(len(mine) - 1)]
        assert sum(changed) >= len(changed) / 2 and not torch.equal(frames[mine[0]], frames[mine[-1]])
        replay = game.Game(scenes[b])
        for t in range(trace.steps[b].item()):
            assert replay.settings == states[mine[t]]
            replay.step(core.ACTION_TOKENS.index(trace.text[b, t + 1].item()))


def test_group_advantage_is_zero_without_spread_and_normalised_with_it():
    returns = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.5, 0.5])
    adv = rl_grpo.group_advantages(returns, 4)
    assert torch.equal(adv[:8], torch.zeros(8))
    assert adv[8] > 0 > adv[9] and abs(adv[8:].mean()) < 1e-6 and abs(adv[8:].std(unbiased=False) - 1) < 1e-3
    unscaled = rl_grpo.group_advantages(returns, 4, scale=False)                    # Dr. GRPO: return - group mean
    assert torch.allclose(unscaled, torch.tensor([0.0] * 8 + [0.5, -0.5, 0.0, 0.0]))


def test_grpo_averages_each_episode_s_actions_or_sums_them_over_the_action_limit():
    lengths, episode = torch.tensor([2.0, 4.0]), torch.tensor([0, 0, 1, 1, 1, 1])
    per_episode = lambda w: [w[episode == e].sum().item() for e in (0, 1)]
    assert per_episode(rl_grpo.action_weights(lengths, episode, "episode")) == [0.5, 0.5]
    w = rl_grpo.action_weights(lengths, episode, "limit")
    assert torch.allclose(w, torch.full((6,), 1 / (2 * game.MAX_ACTIONS)))        # every action alike


def test_hard_scenes_are_those_some_plays_solved_and_replayed_by_learnability():
    rng = np.random.default_rng(0)
    scenes = [game.random_bare_settings(rng) for _ in range(5)]
    hard = rl_grpo.update_hard([], scenes, [0.0, 0.25, 1.0, 0.5, 0.875], [], capacity=2)
    assert hard == [[scenes[3].to_json(), 0.5], [scenes[4].to_json(), 0.875]]        # 0 < p < 1; the newest two
    drawn, picked = rl_grpo.draw_scenes(rng, 4, 0.3, hard, share=0.5)
    assert sorted(picked) == [0, 1] and drawn[:2] == scenes[3:] and len(drawn) == 4   # replayed first, then fresh
    counts = np.bincount([rl_grpo.draw_scenes(rng, 4, 0.3, hard, 0.25)[1][0] for _ in range(400)], minlength=2)
    assert abs(counts[0] / 400 - 0.25 / (0.25 + 0.875 * 0.125)) < 0.08               # in proportion to p(1 - p)
    assert rl_grpo.draw_scenes(rng, 4, 0.3, [], 0.5)[1] == []                       # an empty buffer: all fresh
    again = rl_grpo.update_hard(hard, [scenes[3], scenes[0]], [1.0, 0.5], [0], capacity=8)
    assert again == [hard[1], [scenes[0].to_json(), 0.5]]                # replayed and solved by all: it leaves


def test_returns_prefer_shorter_paths_and_only_success():
    r = core.Rollout([], torch.zeros(3, 32), torch.zeros(3, 5), torch.zeros(3, 5), torch.zeros(3, 5),
                     torch.tensor([True, True, False]), torch.tensor([4, 9, 2]))
    ret = rl_grpo.episode_returns(r, 0.97)
    assert ret[0] > ret[1] > ret[2] == 0


def test_agent_evaluation_measures_the_baselines_in_the_same_run():
    m = core.evaluate_agent(None, 32, "cpu", offsets=(0.3,), n=32)
    assert m["oracle_success@0.3"] > 0.8 > m["random_success@0.3"]
    assert m["oracle_actions@0.3"] < 31
    # reversing never costs the oracle a scene, and a gold behind the agent costs it fewer actions
    assert m["oracle_backward_success@0.3"] >= m["oracle_success@0.3"]
    assert m["oracle_backward_actions@0.3"] < m["oracle_actions@0.3"]


def test_the_random_baseline_plays_the_same_whatever_brain_is_measured_beside_it():
    """Its actions come from a generator of its own: a brain's sampled rollouts, which draw more or fewer
    numbers by what the brain does, do not change the baseline a report sets beside it."""
    cfg = core.make_config("tiny", **SMALL)
    alone = core.evaluate_agent(None, 32, "cpu", offsets=(0.1, 0.3), n=16)
    for seed in (0, 1):
        torch.manual_seed(seed)
        beside = core.evaluate_agent(core.Brain(cfg), 32, "cpu", offsets=(0.1, 0.3), n=16)
        assert {k: beside[k] for k in alone} == alone
    other = core.evaluate_agent(None, 32, "cpu", offsets=(0.1, 0.3), n=16, seed=1)
    assert other["random_actions@0.1"] != alone["random_actions@0.1"]


def rl_args(run_dir, steps, *extra):
    return [*SMALL_ARGS, "--run-dir", run_dir, "--steps", steps, "--batch-size", 4, "--log-every", 1,
            "--save-every", 3, "--eval-every", 6, "--eval-scenes", 4, "--eval-offsets", 0.1, *extra]


@pytest.mark.slow
@pytest.mark.parametrize("stage,extra,reads", [("rl_fake_traces.py", ["--facing-share", 0.5], False),
                                               ("rl_grpo.py", ["--group-size", 3, "--guides", 1, "--hard-share",
                                                               0.5], True)])
def test_a_few_rounds_and_a_killed_run_resumes_exactly(stage, extra, reads, tmp_path):
    if reads:       # from a brain with a text model: the sentences it replays are made once and must survive resume
        (tmp_path / "pretrained").mkdir()
        extra = [*extra, "--vocab", 600, "--replay-sentences", 16, "--eval-frames", 8,
                 "--init-from", *pretrain(tmp_path / "pretrained")]
    out = run_script(stage, *rl_args(tmp_path / "a", 8, *extra)).stdout
    assert "oracle_success@0.1" in out and "random_success@0.1" in out
    if stage == "rl_fake_traces.py":        # the second run draws its scenes in a worker: the same data
        extra = [*extra, "--workers", 1]
    code, _ = kill_when(stage, "batch 4/8", *rl_args(tmp_path / "b", 8, *extra))
    assert code == -signal.SIGKILL
    out = run_script(stage, *rl_args(tmp_path / "b", 8, *extra, "--resume")).stdout
    assert "resuming from" in out
    a = core.load_checkpoint(core.resolve_checkpoint(str(tmp_path / "a")))
    b = core.load_checkpoint(core.resolve_checkpoint(str(tmp_path / "b")))
    assert a["batch"] == b["batch"] == 8
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    if stage == "rl_grpo.py":                                   # the hard-scene buffer came through the kill
        assert a["cursor"]["hard"] and a["cursor"]["hard"] == b["cursor"]["hard"]


@pytest.mark.parametrize("stage,extra,message", [
    ("rl_fake_traces.py", ["--facing-share", 1.5], "--facing-share: must be in [0, 1], not 1.5"),
    ("rl_fake_traces.py", ["--max-agent-offset", 0.05], f"must be at least {game.MIN_BARE_OFFSET}"),
    ("rl_grpo.py", ["--offset-start", 0.05], f"must be at least {game.MIN_BARE_OFFSET}"),
    ("rl_grpo.py", ["--hard-share", 1], "--hard-share: must be in [0, 1), not 1")])
def test_the_agent_stages_name_bad_offsets_and_shares_before_starting(stage, extra, message, tmp_path):
    bad = run_script(stage, *rl_args(tmp_path / "a", 2, *extra), check=False)
    assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr
    assert not os.path.exists(tmp_path / "a")


def test_grpo_logs_its_diagnostics_and_starts_from_imitation(tmp_path):
    run_script("rl_fake_traces.py", *rl_args(tmp_path / "imitation", 3))
    run_script("rl_grpo.py", *rl_args(tmp_path / "grpo", 3, "--group-size", 2, "--init-from", tmp_path / "imitation",
                                       "--scale-rewards", "none", "--length-norm", "limit"))
    records = [json.loads(l) for l in open(tmp_path / "grpo" / "metrics.jsonl")]
    rounds = [r for r in records if r["kind"] == "train"]
    for key in ("success", "return", "episode_len", "entropy", "approx_kl", "clip_frac", "kl_ref", "zero_spread",
                "offset", "round_s", "rss_mb"):
        assert key in rounds[0], key
    # the brain it started from, evaluated before the first round and kept as batch 0: a candidate for the best,
    # so the stage never hands on a brain its rounds made worse (--no-start-eval: none)
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["batch"] for r in evals] == [0, 3]
    start = core.load_checkpoint(os.path.join(tmp_path / "grpo", json.load(
        open(tmp_path / "grpo" / "checkpoints.json"))["written"][0]))
    imitation = core.load_checkpoint(core.resolve_checkpoint(str(tmp_path / "imitation")))
    assert start["batch"] == 0 and all(torch.equal(start["model"][k], imitation["model"][k]) for k in start["model"])
    best = json.load(open(tmp_path / "grpo" / "finished.json"))
    assert best["best_metric"] == max(r["greedy_success@0.3"] for r in evals)
    # the stages evaluate on validation scenes; eval.py reports on test scenes, which no stage chose by
    val = core.evaluate_agent(None, 32, "cpu", (0.1,), 4, split="val")
    assert evals[0]["oracle_actions@0.1"] == val["oracle_actions@0.1"]
    assert val != core.evaluate_agent(None, 32, "cpu", (0.1,), 4, split="test")
    run_script("rl_grpo.py", *rl_args(tmp_path / "none", 3, "--group-size", 2, "--no-start-eval"))
    assert [json.loads(l)["batch"] for l in open(tmp_path / "none" / "metrics.jsonl") if '"eval"' in l] == [3]


def test_validation_and_test_scenes_never_meet():
    """Held-out data has two splits: the stages choose their best on "val", eval.py reports on "test"."""
    for offset in (0.1, 0.3):
        val = {s.to_json() for s in core.agent_scenes(offset, 64, salt=int(offset * 100), split="val")}
        test = {s.to_json() for s in core.agent_scenes(offset, 100, salt=int(offset * 100))}
        assert len(val) == 64 and len(test) == 100 and not val & test
    with pytest.raises(ValueError, match="split must be one of test, val, not 'train'"):
        core.heldout_rng(0, split="train")


@pytest.mark.slow
def test_memory_stays_flat_across_rounds(tmp_path):
    run_script("rl_grpo.py", *rl_args(tmp_path, 80, "--group-size", 2, "--save-every", 0, "--eval-every", 0))
    rss = [json.loads(l)["rss_mb"] for l in open(tmp_path / "metrics.jsonl") if '"train"' in l]
    assert len(rss) == 80
    # after warm-up the allocator still settles by a few MiB now and then (rounds differ in size); a leak of
    # each round's rollout or graph (the original's) grows by more than 1 MiB a round here
    assert rss[-1] - rss[19] < 40, rss


def test_the_step_benchmark_compares_every_greedy_step_with_the_oracle(tmp_path):
    """benchmarks/agent_steps.py: the greedy agent's actions against the oracle's, on eval.py's scenes."""
    spec = importlib.util.spec_from_file_location("agent_steps", os.path.join(ROOT, "benchmarks", "agent_steps.py"))
    agent_steps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agent_steps)
    end = agent_steps.episode_end
    assert end(["left", "forward"], [0.3, 0.25], True) == "success"
    assert end(["left", "</s>"], [0.3, 0.3], False) == "</s> before the limit"
    assert end(["left", "right", "left", "</s>"], [0.3] * 4, False, limit=4) == "limit: turned back and forth"
    assert end(["left", "right", "left", "right"], [0.3] * 4, False) == "limit: turned back and forth"
    assert end(["forward"] * 4, [0.3, 0.2, 0.1, 0.2], False) == "limit: passed the gold"
    assert end(["left"] * 4, [0.3] * 4, False) == "limit: kept turning"
    assert end(["left", "forward", "backward", "forward"], [0.3, 0.3, 0.3, 0.3], False) == "limit: other"
    run_script("rl_fake_traces.py", *rl_args(tmp_path / "imitation", 2))
    out = run_script("benchmarks/agent_steps.py", "--ckpt", tmp_path / "imitation", "--offset", 0.3,
                     "--scenes", 6).stdout
    brain = core.load_brain(str(tmp_path / "imitation"))[0]
    greedy = core.evaluate_agent(brain, brain.cfg.img_size, "cpu", (0.3,), 6, baselines=False)
    assert f"success {greedy['greedy_success@0.3']:.0%}" in out and "(test split)" in out   # eval.py's scenes
    ends = [int(n) for n in re.findall(r"^  (?:success|</s> before the limit|limit: [a-z ]+?) +(\d+)$", out, re.M)]
    assert sum(ends) == 6, out
    steps = int(re.search(r"steps (\d+), agreeing", out).group(1))
    by_action = sum(int(n) for n in re.findall(r"^  (?:forward|left|right) +[\d.]+% \((\d+)\)", out, re.M))
    rows = [(float(o), int(n)) for o, n in re.findall(r"^ +\d+- *\d+ +[\d.]+% +([\d.]+)% \((\d+)\)", out, re.M)]
    assert steps == by_action == sum(n for _, n in rows) > 0, out
    # the share of the steps that took one of the shortest ways on (game.action_values), overall and by angle
    overall = float(re.search(r"one of the shortest ways on ([\d.]+)%", out).group(1))
    assert abs(sum(o * n for o, n in rows) / steps - overall) < 0.1, out
    # the failed episodes by the gold's angle at the start: every failure once, the oracle's failures among them
    failed = [(int(n), int(o)) for n, o in re.findall(r"^ +\d+- *\d+ +(\d+) \((\d+)\)$", out, re.M)]
    assert len(failed) == 4 and sum(n for n, _ in failed) == 6 - round(greedy["greedy_success@0.3"] * 6) and all(o <= n for n, o in failed), out
    # against the oracle that may reverse: its labels (backward among them) and its shortest ways on
    back = run_script("benchmarks/agent_steps.py", "--ckpt", tmp_path / "imitation", "--offset", 0.3,
                      "--scenes", 6, "--oracle-backward").stdout
    assert "against the oracle that may reverse" in back and f"success {greedy['greedy_success@0.3']:.0%}" in back
    by_action = sum(int(n) for n in re.findall(r"^  (?:forward|backward|left|right) +[\d.]+% \((\d+)\)", back, re.M))
    assert by_action == int(re.search(r"steps (\d+), agreeing", back).group(1)), back
    missing = run_script("benchmarks/agent_steps.py", "--ckpt", tmp_path / "nothing", check=False)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr and "nothing" in missing.stderr


def test_the_action_probe_reads_the_oracle_s_action_from_the_keypoint_token_and_from_the_truth(tmp_path):
    """benchmarks/probe_action.py: a fresh reader of the oracle's action on a frozen brain's keypoint token, beside
    the same reader on the scene's true coordinates, by the gold's angle from the heading."""
    brain = small_brain()
    os.makedirs(tmp_path / "run")
    core.Keeper(str(tmp_path / "run"), "rl_fake_traces").save(
        payload(brain, "rl_fake_traces", trained=core.AGENT_PARTS), 1)
    out = run_script("benchmarks/probe_action.py", "--ckpt", tmp_path / "run", "--scenes", 10, "--held-out", 0.3,
                     "--steps", 5, "--batch-size", 16).stdout
    held = int(re.search(r"(\d+) held out", out).group(1))
    rows = re.findall(r"^  (commonest label in bin|keypoint token|truth) +([\d.]+)% \|(.*)$", out, re.M)
    assert [name for name, _, _ in rows] == ["commonest label in bin", "keypoint token", "truth"], out
    for _, overall, cells in rows:
        counts = [int(n) for n in re.findall(r"\((\d+)\)", cells)]
        shares = [float(s) for s in re.findall(r"(\d+)% \(", cells)]
        assert sum(counts) == held > 0 and 0 <= float(overall) <= 100 and all(0 <= s <= 100 for s in shares)
        assert len(cells.split("|")) == 6, out                                      # six angle bins
    assert "backward" not in out.split("\n")[0], out                    # the forward-only oracle's actions
    back = run_script("benchmarks/probe_action.py", "--ckpt", tmp_path / "run", "--scenes", 10, "--held-out", 0.3,
                      "--steps", 5, "--batch-size", 16, "--oracle-backward").stdout
    assert re.search(r"actions .*backward \d+", back.split("\n")[0]), back        # the oracle that reverses
    bad = run_script("benchmarks/probe_action.py", "--ckpt", tmp_path / "run", "--held-out", 1.5, check=False)
    assert bad.returncode == 2 and "--held-out 1.5" in bad.stderr and "Traceback" not in bad.stderr
    missing = run_script("benchmarks/probe_action.py", "--ckpt", tmp_path / "none", check=False)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
