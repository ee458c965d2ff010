"""Can the oracle's next action be read from what the brain sees? A fresh reader on the keypoint token,
beside the same reader on the scene's true coordinates.

benchmarks/agent_steps.py shows the greedy agent agreeing with the oracle in 93-97% of the steps where the
gold is far off its heading, but in 40-64% where it is within 20 degrees (README, "Tenth session: where the
greedy agent goes wrong"). Is that the policy's learning, or what the frame's features hold? On the states of
oracle traces (bare scenes, max_agent_offset drawn from game.MIN_BARE_OFFSET up to --offset), with the brain
frozen, one reader is trained on the oracle's action from:

  - keypoint token: the brain's image context's first token (what its reader and text decoder read of where
    things are);
  - truth: the agent's position, its heading (cos, sin) and the gold's position, from the game: the ceiling
    for a reader of this size on this much data.

The reader: a multiplicative input layer (the inputs beside the products of two learned linear maps of them:
whether the gold lies within the agent's width is a product of coordinates, which a plain MLP of this size
learned poorly even from the truth), then two hidden layers of 512, Adam. Inputs standardised on the training
episodes; the last --held-out share of the scenes (whole episodes) is held out. It prints held-out agreement
overall and by |angle| from the heading to the gold (degrees), with each bin's share of its commonest label
(a reader that ignores the frame within the bin gets that much).

    python benchmarks/probe_action.py --ckpt runs/curriculum/imitation/best
    python benchmarks/probe_action.py --ckpt runs/curriculum/image/best --scenes 300 --steps 1000
    python benchmarks/probe_action.py --ckpt runs/curriculum/turn/best --oracle-backward   # the oracle that reverses
"""
import argparse
import math
import os
import sys
from collections import Counter

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import core  # noqa: E402
import game  # noqa: E402

ANGLE_BINS = (0, 5, 10, 20, 45, 90, 180.01)


class Products(nn.Module):
    """x beside (U x) * (V x)."""

    def __init__(self, d, m=64):
        super().__init__()
        self.u, self.v = nn.Linear(d, m), nn.Linear(d, m)

    def forward(self, x):
        return torch.cat([x, self.u(x) * self.v(x)], -1)


def train_reader(x, y, train, a):
    """Held-out predictions of a fresh reader trained on the rows `train` of x (N, d) for labels y (N,)."""
    torch.manual_seed(a.seed)
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
    net = nn.Sequential(Products(x.shape[1]), nn.Linear(x.shape[1] + 64, 512), nn.GELU(), nn.Linear(512, 512),
                        nn.GELU(), nn.Linear(512, int(y.max()) + 1))
    opt = torch.optim.Adam(net.parameters(), a.lr)
    rows = train.nonzero().squeeze(1)
    for _ in range(a.steps):
        i = rows[torch.randint(0, len(rows), (a.batch_size,))]
        loss = F.cross_entropy(net(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return net(x[~train]).argmax(-1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint, run folder or FOLDER/best with an image encoder")
    p.add_argument("--scenes", type=int, default=900, help="oracle episodes (about 14 states each at 0.3)")
    p.add_argument("--held-out", type=float, default=0.2, help="share of the scenes held out")
    p.add_argument("--offset", type=float, default=0.3, help="the scenes' max_agent_offset is drawn up to this")
    p.add_argument("--steps", type=int, default=4000, help="reader training steps")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--oracle-backward", action="store_true",
                   help="the oracle that may also reverse (rl_fake_traces.py --oracle-backward): its episodes and actions")
    a = p.parse_args(argv)
    if not 0 < a.held_out < 1 or round(a.scenes * a.held_out) in (0, a.scenes):
        raise core.UsageError(f"--held-out {a.held_out} of --scenes {a.scenes} leaves no scene to train or to hold out")
    if not game.MIN_BARE_OFFSET <= a.offset <= 1:
        raise core.UsageError(f"--offset must be in [{game.MIN_BARE_OFFSET}, 1], got {a.offset}")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    brain, _, path = core.load_brain(a.ckpt)
    if not brain.cfg.keypoints:
        raise core.UsageError(f"{path}: this brain has no keypoint token (--keypoints 0); nothing to read")

    rng = np.random.default_rng(a.seed)
    offsets = rng.uniform(game.MIN_BARE_OFFSET, a.offset, a.scenes)
    scenes = [game.random_bare_settings(rng, max_agent_offset=o) for o in offsets]
    r = core.rollout(scenes, "oracle", brain.cfg.img_size, "cpu", seq_len=brain.cfg.seq_len, backward=a.oracle_backward)
    states, episode, _ = r.flat()
    labels = r.labels[r.taken]                                   # the same (episode, step) order as flat()
    names = [game.ACTION_NAMES[core.ACTION_TOKENS.index(int(t))] for t in labels.unique()]
    y = torch.searchsorted(labels.unique(), labels)
    train = episode < a.scenes - round(a.scenes * a.held_out)
    with torch.no_grad():
        token = torch.cat([brain.image_context(game.render(states[i: i + 256], brain.cfg.img_size))[:, 0]
                           for i in range(0, len(states), 256)]).float()
    truth = torch.tensor([[s.agent_x, s.agent_y, math.cos(s.heading), math.sin(s.heading), *s.gold[0]]
                          for s in states], dtype=torch.float32)
    degrees = np.array([abs(math.degrees(game.scene_facts(s)["angle"])) for s in states])[~train.numpy()]
    bins = np.digitize(degrees, ANGLE_BINS) - 1
    held = y[~train].numpy()
    print(f"{path}: {len(states)} states of {a.scenes} oracle episodes (offsets up to {a.offset}), "
          f"{len(held)} held out; actions {', '.join(f'{n} {c}' for n, c in zip(names, np.bincount(y.numpy())))}")
    header = " | ".join(f"{ANGLE_BINS[i]:.0f}-{min(ANGLE_BINS[i + 1], 180):.0f}" for i in range(len(ANGLE_BINS) - 1))
    print(f"held-out agreement with the oracle, overall | by |angle| to the gold (deg): {header}")

    def row(name, correct):
        cells = [f"{correct[bins == i].mean():.0%} ({(bins == i).sum()})" if (bins == i).any() else "-"
                 for i in range(len(ANGLE_BINS) - 1)]
        print(f"  {name:22s} {correct.mean():6.1%} | {' | '.join(cells)}", flush=True)

    majority = np.zeros(len(held), dtype=bool)
    for i in range(len(ANGLE_BINS) - 1):
        if (bins == i).any():
            majority[bins == i] = held[bins == i] == Counter(held[bins == i].tolist()).most_common(1)[0][0]
    row("commonest label in bin", majority)
    for name, x in (("keypoint token", token), ("truth", truth)):
        row(name, (train_reader(x, y, train, a).numpy() == held))


if __name__ == "__main__":
    core.main_guard(main)
