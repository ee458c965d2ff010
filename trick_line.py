"""trick_line.py: stage 3 of the curriculum, the first trick: "draw the line from the agent to the gold".

Given a bare scene and a prompt (core.LINE_PROMPTS: eight hand-written and 580 from a small grammar for
training, three held back), the brain redraws the frame with a blue bar from the agent's rim to the gold's
rim (game.line_target). The original learned this and forgot how to redraw a plain frame (150x worse, with
phantom blue lines), so three losses are mixed:

  line   forward(text, frame)'s image against its target (core.line_trick_loss). Most rows get a prompt
         and must draw the line; --control-share of them get an ordinary sentence (one the text model itself
         wrote) and must give the frame back unchanged, so the line is drawn because it was asked for. 10% by
         default: with 25% the stroke's switch learned the training prompts' words and left out the held-back
         ones in three runs of five (held-back IoU 0.10-0.11; with 10% 0.21-0.35), and all five read them
         better with 10% (mean 0.195 -> 0.311). The curriculum passes 0.25: the QA tutorial lost the 10%
         brain's line in four chains of four (README, "Fewer control sentences"). Line
         pixels (where the line target differs from the frame) weigh --line-weight more in both kinds of row:
         they are about 0.3% of a frame, and with plain MSE drawing nothing is nearly free; on control rows
         the same weight makes a phantom line as costly as a missing one. The image decoder also paints a
         straight stroke (core.Strokes; --strokes 0, on every stage from image pretraining on, for none), and
         the loss pulls its two ends to the ends of the target's bar (game.line_task, from the scene), x
         --end-weight: the pixels alone tell a stroke where to go only once it overlaps the bar; and its
         width, opacity and colour to the bar's, which the pixels alone made twice as wide, half opaque or
         pale (hedges against ends a few pixels off). The stages after this one replay the trick
         (core.line_replay_loss).
  plain  img_autoencoder MSE on frames of the image-pretraining mix, x --plain-weight.
  text   next-token loss of the text model on sentences it wrote itself before this stage, x --text-weight
         (no corpus needed: it pulls the text model back to the language it had). Only when the text parts
         train: by default they are frozen (--freeze text_enc text_dec; pass --freeze with no parts to train
         them). The image decoder learns to read the prompts through the pretrained text features, and the
         text model cannot forget. Trained, the text encoder drifted to fit the eight prompts: on this CPU
         the held-back prompts stopped working and the text loss grew 2.7x in 1,000 batches, text loss or not.

Forgetting is measured against the --init-from brain, before the first step: plain reconstruction MSE
on the image pretraining's held-out frames and text loss on held-out sentences of the text model.
The best checkpoint is the one with the highest line_skill on held-out scenes: the line IoU with held-back
prompts x the share of control sentences answered without a line (a brain that draws whatever it is told
has not learned to draw when asked: the tiny curriculum's line trick was at IoU 0.109 after 200 batches
with a line on 79% of control frames, and 0.101 after 400 with 10%), among the checkpoints whose plain
reconstruction stayed within --forgetting-limit (x1.5 of before, the issue's bound; core.Run.save).

    python trick_line.py --init-from runs/image/pretrain_image_best.pt runs/text/pretrain_text_best.pt
"""
import functools
import os

import torch

import core
import game

NEEDS = ["img_enc", "img_dec", "text_enc", "text_dec"]


def pick(pool, n, rng):
    return pool[torch.from_numpy(rng.integers(len(pool), size=n)).to(pool.device)]


def control_sentences(tokenizer, sentences):
    """The text model's sentences that do not ask for a line ("line" in one would make its target ambiguous)."""
    keep = ["line" not in tokenizer.decode(s).lower() for s in sentences]
    return sentences[torch.tensor(keep, device=sentences.device)]


@torch.no_grad()
def evaluate(brain, tokenizer, scenes, controls, probe, png):
    """Line metrics with held-back and with training prompts, phantom lines, forgetting; a PNG grid."""
    metrics, frames = core.line_metrics(brain, tokenizer, scenes, core.LINE_PROMPTS["heldout"])
    metrics["line_iou_train_prompts"] = core.line_metrics(brain, tokenizer, scenes, core.LINE_PROMPTS["train"])[0]["line_iou"]
    scene = frames["scene"]
    for name, recon in [("plain", brain.img_autoencoder(scene)),
                        ("control", brain(controls[torch.arange(len(scene)) % len(controls)], scene)[1])]:
        # share of bare frames redrawn with a line nobody asked for
        metrics[f"phantom_line_{name}"] = (core.line_mask(recon).flatten(1).sum(1) >= 3).float().mean().item()
    metrics["line_skill"] = metrics["line_iou"] * (1 - metrics["phantom_line_control"])
    metrics.update(core.forgetting(brain, probe))
    core.save_image_grid([frames[k][:8] for k in ("scene", "target", "prediction")], png)
    return metrics


def main(argv=None):
    parser = core.stage_parser(__doc__, steps=1500, batch_size=32, lr=3e-4, warmup=100, eval_every=250,
                               save_every=250)
    parser.add_argument("--line-weight", type=core.in_range(0), default=core.LINE_PIXEL_WEIGHT,
                        help="loss weight of line pixels against the rest")
    parser.add_argument("--end-weight", type=core.in_range(0), default=core.STROKE_END_WEIGHT,
                        help="loss weight of the squared distance of the first stroke's ends from the bar's ends")
    parser.add_argument("--control-share", type=core.in_range(0, 1), default=0.1,
                        help="share of rows given an ordinary sentence, whose target is the frame unchanged")
    core.add_forgetting_args(parser)
    core.add_workers_arg(parser)
    parser.add_argument("--eval-scenes", type=core.at_least(1), default=256,
                        help="held-out bare scenes in each evaluation")
    parser.set_defaults(freeze=["text_enc", "text_dec"])
    args = parser.parse_args(argv)

    run = core.Run("trick_line", args, trains=NEEDS, mode="max")
    brain = run.build(run.tokenizer)      # the brain's vocabulary follows the pretrained tokenizer
    core.check_init_parts(run.origins, run.tokenizer, NEEDS, "trick_line")
    tokenizer, size, B = run.tokenizer, run.cfg.img_size, args.batch_size
    replay, probe = core.forgetting_baseline(run, brain, args)
    controls = control_sentences(tokenizer, replay)
    prompts = tokenizer.encode(core.LINE_PROMPTS["train"], run.cfg.seq_len).to(run.device)
    eval_rng = core.heldout_rng(0, salt=3, split="val")
    scenes = game.random_bare_scenes(eval_rng, args.eval_scenes)
    png = os.path.join(run.run_dir, "lines.png")
    data = run.prefetch_scenes(functools.partial(game.random_bare_scenes, n=B), core.keeping_counts(brain, args, replay))

    for batch in run.batches():
        rng = run.rng()
        with run.timing("data"):
            batch_scenes, kept_scenes = data.get(batch)
            frames, targets, bar_ends, has_bar = game.line_task(batch_scenes, size, run.device)
            control = torch.from_numpy(rng.random(B) < args.control_share).to(run.device)
            text = torch.where(control[:, None], pick(controls, B, rng), pick(prompts, B, rng))
        with run.autocast():
            recon, drawn = brain.draw(text, frames)
            keep, kept = core.keeping_loss(brain, args, replay, kept_scenes, rng)
        want = torch.where(control[:, None, None, None], frames, targets)
        line_loss = core.line_trick_loss(recon, frames, targets, want, args.line_weight, drawn,
                                         (bar_ends, has_bar & ~control), args.end_weight)
        loss = line_loss + keep
        run.step(loss)
        run.log_step({"loss": loss.item(), "line": line_loss.item(), "plain": kept["plain"].item(),
                      "text": kept["text"].item()}, samples=B)
        if run.due(args.eval_every) or run.final():
            metrics = evaluate(brain, tokenizer, scenes, controls, probe, png)
            run.save(metrics, metric=metrics["line_skill"])
        elif run.due(args.save_every):
            run.save()
    run.close()


if __name__ == "__main__":
    core.main_guard(main)
