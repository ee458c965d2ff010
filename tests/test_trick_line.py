"""The line trick: its metrics on hand-made pictures, and the stage as a user runs it (a few steps of a
small brain from small pretrained checkpoints, exact resume after SIGKILL, a clear error without text parts)."""
import argparse
import dataclasses
import itertools
import json
import math
import signal

import numpy as np
import pytest
import torch

import core
import game
import pretrain_text
from conftest import kill_when, run_script
from pretrained import SKILL_ARGS, pretrain, skill_sentences

SIZE = 64


def scene(agent, gold, heading=0.0):
    return game.Settings(agent[0], agent[1], heading, gold=[gold])


def blue(mask):
    """A white picture with the masked pixels in the line's blue."""
    img = torch.ones(1, 3, *mask.shape)
    img[0, :, mask] = torch.tensor([0, 0, 213 / 255])[:, None]
    return img


def test_line_iou_on_hand_made_pictures():
    a, b = torch.zeros(8, 8, dtype=torch.bool), torch.zeros(8, 8, dtype=torch.bool)
    a[2, 1:7], b[2, 4:8] = True, True                   # 6 and 4 pixels, 3 shared, 7 in the union
    iou = lambda p, t: core.line_scores(blue(p), blue(t))["iou"].item()
    assert iou(a, a) == 1.0
    assert iou(a, b) == pytest.approx(3 / 7)
    assert iou(torch.zeros_like(a), a) == 0.0             # drawing nothing
    assert iou(torch.zeros_like(a), torch.zeros_like(a)) == 1.0


def test_line_geometry_reads_angle_and_length_off_the_true_line():
    horizontal = game.line_target([scene((0.3, 0.5), (0.7, 0.5))], SIZE)
    angle, length, n = core.line_geometry(core.line_mask(horizontal))
    expected = (0.4 - game.AGENT_RADIUS - game.GOLD_RADIUS) * SIZE
    assert abs(angle.item()) < 0.05 and abs(length.item() - expected) <= 2 and n.item() > expected
    diagonal = game.line_target([scene((0.3, 0.3), (0.6, 0.6))], SIZE)     # y down: the bar runs to the lower right
    assert math.degrees(core.line_geometry(core.line_mask(diagonal))[0].item()) == pytest.approx(45, abs=3)
    s = core.line_scores(diagonal, horizontal)
    assert s["angle_err"].item() == pytest.approx(45, abs=3) and s["found"].item() and s["iou"].item() < 0.2


class Drawer(torch.nn.Module):
    """A stand-in brain that answers every prompt with fixed pictures."""

    def __init__(self, pictures):
        super().__init__()
        self.cfg = core.make_config("tiny", img_size=SIZE, patch=8)
        self.pictures, self.w = pictures, torch.nn.Parameter(torch.zeros(1))

    def forward(self, text, img):
        return None, self.pictures[: len(img)]


class Words:
    def encode(self, texts, seq_len):
        return torch.zeros(len(texts), seq_len, dtype=torch.long)


def test_line_metrics_score_a_perfect_drawer_and_the_baselines():
    scenes = [game.random_bare_settings(i) for i in range(16)]
    targets = game.line_target(scenes, SIZE)
    perfect, _ = core.line_metrics(Drawer(targets), Words(), scenes, ["draw"])
    assert perfect["line_iou"] == 1.0 and perfect["angle_err_deg"] < 1e-3 and perfect["task_mse"] == 0.0
    assert perfect["iou_nothing"] == 0.0 and 0 < perfect["iou_mean_line"] < 0.3
    lazy, _ = core.line_metrics(Drawer(game.render(scenes, SIZE)), Words(), scenes, ["draw"])
    assert lazy["line_iou"] == 0.0 and lazy["line_found"] == 0.0 and lazy["task_mse"] > 0


def test_prompts_are_many_and_the_held_back_ones_are_new():
    train, heldout = core.LINE_PROMPTS["train"], core.LINE_PROMPTS["heldout"]
    assert len(set(train)) >= 6 and heldout and not set(train) & set(heldout)
    assert not set(heldout) & set(pretrain_text._game_pool())
    # the grammar's requests: many, none in a held-back prompt's frame or words, none closer to a held-back
    # prompt than the nearest hand-written one
    hand, grammar = train[:8], train[8:]
    assert len(grammar) > 100 and len(set(train)) == len(train)
    assert not any(word in p.lower() for p in grammar for word in ("could you", "joining", "link", "trace", "path"))
    for h in heldout:
        assert max(core.closeness(h, p) for p in grammar) <= max(core.closeness(h, p) for p in hand)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return pretrain(tmp_path_factory.mktemp("pretrained"))


def stage_args(run_dir, steps, init):
    return [*SKILL_ARGS, "--run-dir", run_dir, "--steps", steps, "--batch-size", 8, "--warmup", 2, "--log-every", 2,
            "--save-every", 4, "--eval-every", 6, "--eval-scenes", 8, "--eval-frames", 8, "--replay-sentences", 32,
            "--plain-batch", 3, "--text-batch", 4, "--init-from", *init]


def test_a_few_steps_measure_the_trick_and_forgetting_and_a_killed_run_resumes_exactly(tmp_path, pretrained):
    out = run_script("trick_line.py", *stage_args(tmp_path / "a", 12, pretrained)).stdout
    assert "held-out sentences of text pretraining, val split): plain_mse" in out
    for key in ("line_iou", "iou_nothing", "iou_mean_line", "angle_err_deg", "task_mse", "phantom_line_plain",
                "plain_mse_ratio", "text_loss_ratio"):
        assert f"{key} " in out
    ckpt = core.load_checkpoint(str(tmp_path / "a" / "trick_line_best.pt"))
    assert ckpt["metrics"]["line_iou"] >= 0 and ckpt["metrics"]["plain_mse_before"] > 0
    m = ckpt["metrics"]      # the best is chosen by the IoU x the control frames left without a line
    assert m["line_skill"] == pytest.approx(m["line_iou"] * (1 - m["phantom_line_control"]))
    assert json.loads((tmp_path / "a" / "checkpoints.json").read_text())["best_metric"] == pytest.approx(m["line_skill"])
    from PIL import Image
    grid = Image.open(tmp_path / "a" / "lines.png")
    assert (grid.width, grid.height) == (8 * 32 * 2, 3 * 32 * 2)        # scene, target, prediction

    # benchmarks/line_ceiling.py takes the best brain's IoU apart, here on the stage's own held-out scenes (the
    # validation split; by default it plays eval.py's, the test split)
    out = run_script("benchmarks/line_ceiling.py", "--ckpt", tmp_path / "a" / "best", "--scenes", 8,
                     "--split", "val").stdout
    figures = {line[:44].strip(): float(line[44:]) for line in out.splitlines()[1:]}
    assert figures["IoU, the brain"] == pytest.approx(m["line_iou"], abs=1e-3)
    assert figures["the bar's half-width (px)"] == pytest.approx(game.LINE_WIDTH / 2 * 32, abs=1e-3)
    assert figures["IoU, the true ends in the bar's look"] > figures["IoU, the brain"]      # 12 batches: far off

    # the second run draws its scenes in a worker process: the same data, so the same weights
    code, _ = kill_when("trick_line.py", "batch 6/12", *stage_args(tmp_path / "b", 12, pretrained), "--workers", 1)
    assert code == -signal.SIGKILL
    out = run_script("trick_line.py", *stage_args(tmp_path / "b", 12, pretrained), "--resume", "--workers", 1).stdout
    assert "resuming from" in out and "before this stage" not in out        # the baseline came from the checkpoint
    a, b = (core.load_checkpoint(core.resolve_checkpoint(str(tmp_path / d))) for d in "ab")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert json.dumps(a["metrics"]) == json.dumps(b["metrics"])       # NaN angle errors compare equal here


def test_a_checkpoint_past_the_forgetting_limit_is_the_best_only_when_none_stays_within(tmp_path, pretrained):
    assert not core.past_forgetting_limit({"plain_mse_ratio": 1.5}, 1.5)      # the bound: x1.5 is within
    assert core.past_forgetting_limit({"plain_mse_ratio": 1.502}, 1.5)
    assert not core.past_forgetting_limit({"plain_mse_ratio": 9.0}, 0)        # 0: no limit
    assert not core.past_forgetting_limit({"line_iou": 0.3}, 1.5)            # nothing measured, nothing past
    # a limit no brain keeps: both evaluations are past it, and the one that forgot least is the best
    out = run_script("trick_line.py", *stage_args(tmp_path / "a", 12, pretrained), "--forgetting-limit", 1e-6).stdout
    assert out.count("past --forgetting-limit 1e-06") == 2
    evals = [e for e in map(json.loads, (tmp_path / "a" / "metrics.jsonl").read_text().splitlines())
             if e["kind"] == "eval"]
    ratios = {e["batch"]: e["plain_mse_ratio"] for e in evals}
    assert sorted(ratios) == [6, 12] and all(r > 1e-6 for r in ratios.values())
    manifest = json.loads((tmp_path / "a" / "checkpoints.json").read_text())
    assert manifest["best_metric"] == pytest.approx(-min(ratios.values()))
    best = core.load_checkpoint(str(tmp_path / "a" / "trick_line_best.pt"))
    assert best["batch"] == min(ratios, key=ratios.get)


def test_an_image_only_checkpoint_is_refused_with_what_is_missing(tmp_path, pretrained):
    bad = run_script("trick_line.py", *stage_args(tmp_path, 2, pretrained[:1]), check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "text_enc" in bad.stderr and "tokenizer" in bad.stderr


def test_the_stages_after_the_trick_replay_it_into_img_dec_alone():
    """keeping_loss, handed the tokenizer as `line`, adds the line trick's loss on fresh scenes x
    --line-replay-weight. Its gradient reaches img_dec, strokes included (their end loss), and nothing that the
    answers and the agent read: img_enc and text_enc stay untouched. With img_dec frozen it is not computed
    (img_enc and text_enc still training), nor without the tokenizer."""
    tokenizer = core.Tokenizer.train(skill_sentences(), 600)
    torch.manual_seed(0)
    brain = core.Brain(core.make_config("tiny", img_size=32, patch=8, width=32, img_heads=2, text_heads=2,
                                        value_heads=2, vocab=tokenizer.vocab, strokes=1))
    parser = argparse.ArgumentParser()
    core.add_forgetting_args(parser, qa_replay=True)
    args = lambda weight, pointer=0.2: parser.parse_args(["--plain-weight", "0", "--text-weight", "0",
                                                          "--line-replay-batch", "4", "--line-replay-weight", str(weight),
                                                          "--line-replay-pointer-weight", str(pointer)])
    replay = tokenizer.encode(["The red cat sat by the door."] * 4, brain.cfg.seq_len)

    def keeping(weight, line=tokenizer, pointer=0.2):    # the scenes the stage's workers would draw, then the losses
        a = args(weight, pointer)
        scenes = core.keeping_scenes(np.random.default_rng(1), **core.keeping_counts(brain, a, replay, line=line))
        return core.keeping_loss(brain, a, replay, scenes, np.random.default_rng(1), line=line)

    total, kept = keeping(1)
    assert kept["line"].item() > 0 and total.item() == pytest.approx(kept["line"].item())
    doubled = keeping(2)[0]
    assert doubled.item() == pytest.approx(2 * total.item())
    # the pointers' cross-entropy (--line-replay-pointer-weight, here 0.2; off by default) adds in proportion
    without, twice = keeping(1, pointer=0)[0].item(), keeping(1, pointer=0.4)[0].item()
    assert without < total.item() and twice - without == pytest.approx(2 * (total.item() - without), rel=1e-4)
    total.backward()
    assert brain.img_dec.unpatchify.weight.grad.abs().sum() > 0
    assert brain.img_dec.strokes.offset.weight.grad.abs().sum() > 0          # the end loss moves the pointers
    for part in ("img_enc", "text_enc", "text_dec", "reader"):
        assert all(p.grad is None or not p.grad.any() for p in getattr(brain, part).parameters()), part
    assert keeping(1, line=None)[1]["line"].item() == 0
    brain.img_dec.requires_grad_(False)
    assert keeping(1)[1]["line"].item() == 0


def test_the_bar_ends_on_the_rims_agent_end_first_where_the_target_draws_it():
    settings = [scene((0.3, 0.5), (0.7, 0.5)), scene((0.7, 0.5), (0.3, 0.5)), scene((0.6, 0.3), (0.2, 0.8)),
                scene((0.5, 0.5), (0.5 + game.AGENT_RADIUS, 0.5))]                  # the last: gold touching the agent
    frames, targets, ends, has = game.line_task(settings, SIZE)
    assert torch.equal(frames, game.render(settings, SIZE)) and torch.equal(targets, game.line_target(settings, SIZE))
    rim, gold_rim = 0.3 + game.AGENT_RADIUS, 0.7 - game.GOLD_RADIUS
    assert has.tolist() == [True, True, True, False] and ends.dtype == torch.float32
    assert torch.allclose(ends[0], torch.tensor([[rim, 0.5], [gold_rim, 0.5]]))
    assert torch.allclose(ends[1], torch.tensor([[1 - rim, 0.5], [1 - gold_rim, 0.5]]))         # the agent's first
    # the target picture's bar lies between them: its pixels' extremes along its axis are the ends, within a pixel
    centre, angle, lo, hi, n = core.principal_axis((targets[:3] != frames[:3]).any(1))
    u = torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    seen = ((centre[:, None] + torch.stack([lo, hi], 1)[..., None] * u[:, None]) + 0.5) / SIZE
    for b in range(3):
        assert n[b] > 0
        assert min((seen[b] - ends[b]).norm(dim=1).max(), (seen[b].flip(0) - ends[b]).norm(dim=1).max()) < 1.5 / SIZE


def test_paint_draws_a_bar_where_its_ends_are():
    white = torch.ones(2, 3, SIZE, SIZE)
    ends = torch.tensor([[[[0.25, 0.5], [0.75, 0.5]]], [[[0.5, 0.2], [0.5, 0.8]]]])          # (2 images, 1 bar)
    blue = torch.tensor([0, 0, 213 / 255]).expand(2, 1, 3)
    painted = core.paint(white, ends, torch.full((2, 1), 1 / SIZE), torch.ones(2, 1), blue)
    mask = core.line_mask(painted)
    assert mask[0, 31:33, 17:47].all() and not mask[0, :28].any() and not mask[0, :, :14].any()
    # square ends, as the game's bar: x from 0.25 to 0.75 of 64 pixels is columns 16 to 47, not one more
    assert mask[0, 31:33, 16:48].all() and not mask[0, :, :16].any() and not mask[0, :, 48:].any()
    assert mask[1, 14:50, 31:33].all() and not mask[1, :, :28].any()
    assert torch.equal(core.paint(white, ends, torch.full((2, 1), 1 / SIZE), torch.zeros(2, 1), blue), white)


def drawing_brain(frames):
    """A fresh small brain with a stroke (seed 0), and what it draws over these frames for an empty text."""
    torch.manual_seed(0)
    brain = core.Brain(core.make_config("tiny", img_size=SIZE, patch=8, width=32, img_heads=2, text_heads=2,
                                        value_heads=2, vocab=100, strokes=1))
    text = torch.full((len(frames), brain.cfg.seq_len), core.PAD)
    text[:, :2] = torch.tensor([core.BOS, core.EOS])
    return brain, brain.draw(text, frames)


def test_the_line_loss_teaches_the_strokes_where_the_bar_ends_and_how_wide_it_is():
    """line_trick_loss adds end_weight x the squared distance of the first stroke's ends from the bar's, and the
    squared distances of its width from the bar's (in bar widths), its opacity from 1 and its colour from the bar's;
    on a control row, whose wanted frame has no bar, only that of its opacity from 0. Its gradient reaches the
    strokes' pointers, width, opacity and colour."""
    settings = [scene((0.3, 0.5), (0.7, 0.5)), scene((0.6, 0.3), (0.2, 0.8))]
    frames, targets, *bar = game.line_task(settings, SIZE)
    true, has = bar
    recon = frames.clone()
    plain = core.line_trick_loss(recon, frames, targets, targets)
    exact, opaque, blue = torch.full((2, 1), game.LINE_WIDTH / 2), torch.ones(2, 1), torch.tensor([[[0, 0, 213 / 255]]] * 2)
    right = core.Drawn(true[:, None], exact, opaque, blue)
    assert core.line_trick_loss(recon, frames, targets, targets, drawn=right, bar=bar).item() == pytest.approx(plain.item())
    moved = right._replace(ends=true[:, None] + torch.tensor([0.1, 0.0]))
    with_ends = core.line_trick_loss(recon, frames, targets, targets, drawn=moved, bar=bar, end_weight=3.0)
    assert with_ends.item() == pytest.approx(plain.item() + 3.0 * (2 * 0.1 ** 2 * 2) / 2, rel=1e-4)
    wide = right._replace(half_width=2 * exact)                      # twice the bar's width
    with_width = core.line_trick_loss(recon, frames, targets, targets, drawn=wide, bar=bar, end_weight=3.0)
    assert with_width.item() == pytest.approx(plain.item() + 1.0, rel=1e-4)        # (2 - 1)^2 a row, either weight
    faint = right._replace(opacity=torch.full((2, 1), 0.5))
    assert core.line_trick_loss(recon, frames, targets, targets, drawn=faint, bar=bar).item() == pytest.approx(
        plain.item() + 0.5 ** 2, rel=1e-4)
    pale = right._replace(colour=torch.tensor([[[0.5, 0.5, 213 / 255]]] * 2))
    assert core.line_trick_loss(recon, frames, targets, targets, drawn=pale, bar=bar).item() == pytest.approx(
        plain.item() + 2 * 0.5 ** 2, rel=1e-4)
    control = (true, torch.zeros_like(has))          # control rows want no bar: only the opacity, towards 0
    unasked = core.line_trick_loss(recon, frames, targets, frames)
    hidden = moved._replace(half_width=2 * exact, colour=pale.colour, opacity=torch.zeros(2, 1))
    assert core.line_trick_loss(recon, frames, targets, frames, drawn=hidden, bar=control).item() == pytest.approx(
        unasked.item())
    assert core.line_trick_loss(recon, frames, targets, frames, drawn=hidden._replace(opacity=faint.opacity),
                                bar=control).item() == pytest.approx(unasked.item() + 0.5 ** 2, rel=1e-4)
    with pytest.raises(ValueError, match="bar"):
        core.line_trick_loss(recon, frames, targets, targets, drawn=moved)
    brain, (recon, drawn) = drawing_brain(frames)
    assert drawn.ends.shape == (2, 1, 2, 2) and drawn.half_width.shape == (2, 1) and recon.shape == frames.shape
    core.line_trick_loss(recon, frames, targets, targets, drawn=drawn, bar=bar).backward()
    assert brain.img_dec.strokes.query.weight.grad.abs().sum() > 0
    assert brain.img_dec.strokes.offset.weight.grad.abs().sum() > 0
    assert brain.img_dec.strokes.style.weight.grad[2:].abs().sum(1).min() > 0    # half-width, opacity, colour rows
    bare = core.Brain(dataclasses.replace(brain.cfg, strokes=0))
    text = torch.full((2, brain.cfg.seq_len), core.PAD)
    assert bare.draw(text, frames)[1] is None


def test_the_replay_s_pointer_term_is_the_cross_entropy_of_the_patches_that_hold_the_bar_s_ends():
    """With pointer_weight, line_trick_loss adds that x the cross-entropy of the first stroke's two pointers
    against the patches holding the bar's ends, summed over the rows that want a bar and divided by the rows:
    nothing for pointers sure of those patches, 2 log(patches) a row for pointers that look everywhere alike.
    Brain.draw gives where the pointers looked, as log-probabilities over the patches."""
    settings = [scene((0.3, 0.5), (0.7, 0.5)), scene((0.6, 0.3), (0.2, 0.8))]
    frames, targets, *bar = game.line_task(settings, SIZE)
    true, has = bar
    recon, g = frames.clone(), 8                                           # 8 x 8 patches
    plain = core.line_trick_loss(recon, frames, targets, targets)
    cell = (true * g).long()
    sure = torch.full((2, 1, 2, g * g), -1e4)
    for b, e in itertools.product(range(2), range(2)):
        sure[b, 0, e, cell[b, e, 1] * g + cell[b, e, 0]] = 0.0
    right = core.Drawn(true[:, None], torch.full((2, 1), game.LINE_WIDTH / 2), torch.ones(2, 1),
                       torch.tensor([[[0, 0, 213 / 255]]] * 2), sure)
    assert core.line_trick_loss(recon, frames, targets, targets, drawn=right, bar=bar,
                                pointer_weight=0.5).item() == pytest.approx(plain.item())
    anywhere = right._replace(pointers=torch.full((2, 1, 2, g * g), -math.log(g * g)))
    assert core.line_trick_loss(recon, frames, targets, targets, drawn=anywhere, bar=bar, pointer_weight=0.5).item() \
        == pytest.approx(plain.item() + 0.5 * 2 * 2 * math.log(g * g) / 2, rel=1e-4)
    assert core.line_trick_loss(recon, frames, targets, targets, drawn=anywhere, bar=bar).item() == pytest.approx(
        plain.item())                                                       # the line trick's own loss: no such term
    unasked = core.line_trick_loss(recon, frames, targets, frames, drawn=anywhere._replace(opacity=torch.zeros(2, 1)),
                                   bar=(true, torch.zeros_like(has)), pointer_weight=0.5)
    assert unasked.item() == pytest.approx(core.line_trick_loss(recon, frames, targets, frames).item())
    with pytest.raises(ValueError, match="pointer"):
        core.line_trick_loss(recon, frames, targets, targets, drawn=right._replace(pointers=None), bar=bar,
                             pointer_weight=0.5)
    brain, (recon, drawn) = drawing_brain(frames)
    assert drawn.pointers.shape == (2, 1, 2, g * g)
    assert torch.allclose(drawn.pointers.exp().sum(-1), torch.ones(2, 1, 2))
    core.line_trick_loss(recon, frames, targets, targets, drawn=drawn, bar=bar, pointer_weight=1.0).backward()
    assert brain.img_dec.strokes.key.weight.grad.abs().sum() > 0
