"""Where does the greedy agent go wrong? Every step of its episodes against the oracle's action for that state.

The agent stages report success within 31 actions; this shows why an episode failed. It plays the brain
greedily on the held-out scenes of one offset (core.agent_scenes: eval.py's test split, or --split val,
the scenes the agent stages evaluate on and choose their best by) and, at every
state it met, compares its action with the forward-only oracle's for that state (core.rollout labels them):

  - agreement by the oracle's action (forward, left, right) and the confusion between them;
  - agreement by the gold's angle from the heading (|angle| in degrees; "ahead" is within the agent's
    width, about 10 degrees at offset 0.3), which separates reading the heading coarsely from finely;
    beside it, the share of steps whose action was one of the shortest ways on among forward, left and right
    (game.action_values: that action, then the oracle), since near alignment walking now or after one more
    turn often tie and the oracle takes one of them;
  - failed episodes by how they ended: </s> before the action limit, or the limit reached (its last action
    may be </s>) having turned back and forth (a turn undone by the next action, twice or more), having
    kept turning (four actions in five or more), having passed the gold (closest, then farther), or
    otherwise;
  - failed episodes by the gold's angle from the heading at the start, beside how many of those scenes the
    forward-only oracle fails too: with 6 degrees a turn, a gold behind the agent costs about 30 of the 31
    actions in turning alone.

    python benchmarks/agent_steps.py --ckpt runs/curriculum/grpo/best
    python benchmarks/agent_steps.py --ckpt runs/curriculum/grpo/best --offset 0.5 --scenes 200
    python benchmarks/agent_steps.py --ckpt runs/imitation/best --oracle-backward   # an agent that imitated it

With --oracle-backward the oracle that may also reverse stands in for the forward-only one everywhere (the
action compared with, the shortest ways on among forward, backward, left and right, the scenes it fails).
"""
import argparse
import math
import os
import sys
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import core  # noqa: E402
import game  # noqa: E402

ANGLE_BINS = (0, 5, 10, 20, 45, 90, 180.01)
START_BINS = (0, 45, 90, 135, 180.01)
NAMES = {core.ACTION_TOKENS[a]: game.ACTION_NAMES[a] for a in core.POLICY_ACTIONS} | {core.EOS: "</s>"}


def bin_of(value, bins):
    """The index i of the bin bins[i] <= value < bins[i + 1]."""
    return next(i for i in range(len(bins) - 1) if value < bins[i + 1])


def episode_end(actions, distances, success, limit=game.MAX_ACTIONS):
    """How an episode ended: success, </s> before the action limit, or at the limit (</s> as its last action
    included) after turning back and forth, after passing the gold, or otherwise."""
    if success:
        return "success"
    if actions and actions[-1] == "</s>" and len(actions) < limit:
        return "</s> before the limit"
    flips = sum({a, b} == {"left", "right"} for a, b in zip(actions, actions[1:]))   # a turn undone at once
    if flips >= 2:
        return "limit: turned back and forth"
    if sum(a in ("left", "right") for a in actions) >= 0.8 * len(actions):
        return "limit: kept turning"
    closest = min(range(len(distances)), key=distances.__getitem__)
    if closest < len(distances) - 1 and distances[-1] > distances[closest] + game.STEP / 2:
        return "limit: passed the gold"
    return "limit: other"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint, run folder or FOLDER/best of an agent stage")
    p.add_argument("--offset", type=float, default=0.3, help="max_agent_offset of the held-out scenes")
    p.add_argument("--scenes", type=int, default=100, help="held-out scenes (eval.py uses 100)")
    p.add_argument("--split", choices=list(core.HELDOUT_SPLITS), default="test",
                   help="held-out split: test (eval.py's scenes) or val (the stages' own evaluation's)")
    p.add_argument("--oracle-backward", action="store_true",
                   help="compare with the oracle that may also reverse (rl_fake_traces.py --oracle-backward)")
    a = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    brain, _, path = core.load_brain(a.ckpt)
    scenes = core.agent_scenes(a.offset, a.scenes, salt=int(a.offset * 100), split=a.split)   # test: eval.py's
    back = a.oracle_backward
    r = core.rollout(scenes, "greedy", brain.cfg.img_size, "cpu", brain=brain, seq_len=brain.cfg.seq_len,
                     backward=back)                         # backward: which oracle labels the states
    oracle = core.rollout(scenes, "oracle", brain.cfg.img_size, "cpu", seq_len=brain.cfg.seq_len,
                          backward=back).success

    states, episode, step = r.flat()
    # the oracle's moves (without reversing, backward can be shorter than what the oracle does)
    moves = (game.FORWARD, game.BACKWARD, game.LEFT, game.RIGHT) if back else (game.FORWARD, game.LEFT, game.RIGHT)
    values = game.action_values(states, moves, backward=back)
    best = {(int(b), int(t)): {game.ACTION_NAMES[a] for a, v in zip(moves, row) if v == min(row)}
            for b, t, row in zip(episode, step, values.tolist())}
    by_oracle, by_angle, optimal, confusion, ends = Counter(), Counter(), Counter(), Counter(), Counter()
    failed = Counter()                                      # (start bin, the oracle failed too)
    for b in range(len(scenes)):
        steps = int(r.steps[b])
        actions = [NAMES[int(x)] for x in r.text[b, 1: steps + 1]]
        distances, degrees = [], []
        for t in range(steps):
            facts = game.scene_facts(r.states[t][b])
            distances.append(facts["distance"])
            degrees.append(abs(math.degrees(facts["angle"])))
            want, got = NAMES[int(r.labels[b, t])], actions[t]
            confusion[want, got] += 1
            by_oracle[want, want == got] += 1
            bin_ = bin_of(degrees[t], ANGLE_BINS)
            by_angle[bin_, want == got] += 1
            optimal[bin_] += got in best[b, t]
        ends[episode_end(actions, distances, bool(r.success[b]))] += 1
        if not r.success[b]:
            failed[bin_of(degrees[0], START_BINS), not oracle[b]] += 1

    total = sum(confusion.values())
    agree = sum(n for (w, g), n in confusion.items() if w == g)
    print(f"{path}: greedy, {a.scenes} held-out scenes ({a.split} split) at offset {a.offset}, against the "
          f"{'oracle that may reverse' if back else 'forward-only oracle'}")
    print(f"success {ends['success'] / a.scenes:.0%}; steps {total}, agreeing with the oracle {agree / total:.1%}, "
          f"one of the shortest ways on {sum(optimal.values()) / total:.1%}")
    print("\nby the oracle's action: agreement (steps)")
    for want in ("forward", "backward", "left", "right"):
        n = by_oracle[want, True] + by_oracle[want, False]
        if n:
            row = ", ".join(f"{g} {confusion[want, g]}" for g in NAMES.values() if confusion[want, g])
            print(f"  {want:8s} {by_oracle[want, True] / n:6.1%} ({n}); taken: {row}")
    print("\nby |angle| to the gold (degrees): agreement with the oracle, one of the shortest ways on (steps)")
    for i in range(len(ANGLE_BINS) - 1):
        n = by_angle[i, True] + by_angle[i, False]
        if n:
            print(f"  {ANGLE_BINS[i]:3.0f}-{min(ANGLE_BINS[i + 1], 180):3.0f}  {by_angle[i, True] / n:6.1%}  "
                  f"{optimal[i] / n:6.1%} ({n})")
    print("\nepisodes by how they ended")
    for end, n in ends.most_common():
        print(f"  {end:30s} {n}")
    print(f"\nfailed episodes by |angle| to the gold at the start (degrees): episodes (the oracle fails too); "
          f"the oracle fails {int((~oracle).sum())} of the {a.scenes} scenes")
    for i in range(len(START_BINS) - 1):
        n = failed[i, False] + failed[i, True]
        print(f"  {START_BINS[i]:3.0f}-{min(START_BINS[i + 1], 180):3.0f}  {n:4d} ({failed[i, True]})")


if __name__ == "__main__":
    core.main_guard(main)
