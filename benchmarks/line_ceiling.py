"""Where does a line brain lose its IoU: the stroke's ends, or its look (width, opacity, colour), or the paint?

The line trick's IoU compares the blue pixels of the redrawn frame with the target's bar. The brain paints the
bar as a stroke (core.Strokes) over the image decoder's patch picture. This repaints the stroke on that same
picture with parts of it replaced by the truth (game.line_task gives the bar's ends; its look is
game.LINE_WIDTH wide, opaque, game.PALETTE's "line to gold"), on eval.py's held-out line scenes (--split val:
trick_line.py's own):

  - the brain's IoU, as eval.py reports it;
  - its look, at the bar's true ends: what its ends cost;
  - its ends, in the bar's look: what its look costs;
  - the true ends in the bar's look: what the paint itself can reach on this picture, at this size;
  - the stroke's end errors in pixels (the agent's end, the gold's), and its look beside the bar's.

    python benchmarks/line_ceiling.py --ckpt runs/curriculum/line/best
    python benchmarks/line_ceiling.py --ckpt runs/curriculum/grpo/best --prompts train --scenes 128
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import core  # noqa: E402
import game  # noqa: E402


@torch.no_grad()
def ceiling(brain, tokenizer, scenes, prompts):
    """{figure: value} for these scenes, each asked one of the prompts in turn (as core.line_metrics asks)."""
    size = brain.cfg.img_size
    frames, targets, true_ends, has = game.line_task(scenes, size)
    text = tokenizer.encode([prompts[i % len(prompts)] for i in range(len(scenes))], brain.cfg.seq_len)
    drawn_img, drawn = brain.draw(text, frames)
    picture = brain.img_dec(brain.img_enc(frames), brain.text_enc(text), text != core.PAD, strokes=False)
    n = len(scenes)
    bar_look = (torch.full((n, 1), game.LINE_WIDTH / 2), torch.ones(n, 1),
                (torch.tensor(core.PALETTE["line"], dtype=torch.float) / 255).expand(n, 1, 3))
    own_look = (drawn.half_width[:, :1], drawn.opacity[:, :1], drawn.colour[:, :1])

    def iou(img):
        return core.line_scores(img, targets)["iou"][has].mean().item()

    errors = (drawn.ends[:, 0] - true_ends).norm(dim=-1)[has] * size          # (scenes with a bar, 2) pixels
    return {"IoU, the brain": iou(drawn_img),
            "IoU, its look at the true ends": iou(core.paint(picture, true_ends[:, None], *own_look)),
            "IoU, its ends in the bar's look": iou(core.paint(picture, drawn.ends[:, :1], *bar_look)),
            "IoU, the true ends in the bar's look": iou(core.paint(picture, true_ends[:, None], *bar_look)),
            "agent's end off (px), median": errors[:, 0].median().item(),
            "agent's end off (px), 90th percentile": errors[:, 0].quantile(0.9).item(),
            "gold's end off (px), median": errors[:, 1].median().item(),
            "gold's end off (px), 90th percentile": errors[:, 1].quantile(0.9).item(),
            "half-width (px), median": drawn.half_width[has, 0].median().item() * size,
            "the bar's half-width (px)": game.LINE_WIDTH / 2 * size,
            "opacity, median": drawn.opacity[has, 0].median().item(),
            "colour's distance from the bar's, median": (drawn.colour[has, 0] - bar_look[2][0, 0]).norm(dim=-1)
            .median().item()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint, run folder or FOLDER/best of a brain with strokes")
    p.add_argument("--scenes", type=core.at_least(1), default=256, help="held-out line scenes (eval.py uses 256)")
    p.add_argument("--prompts", choices=["heldout", "train"], default="heldout", help="which prompts ask for the line")
    p.add_argument("--split", choices=list(core.HELDOUT_SPLITS), default="test",
                   help="held-out split: test (eval.py's scenes) or val (trick_line.py's own evaluation's)")
    a = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    brain, ckpt, path = core.load_brain(a.ckpt)
    if not brain.cfg.strokes:
        raise core.UsageError(f"{path}: this brain paints no strokes (strokes 0): nothing to take apart")
    if not ckpt.get("tokenizer"):
        raise core.UsageError(f"{path}: no tokenizer in this checkpoint (image pretraining alone?): it reads no prompt")
    tokenizer = core.Tokenizer.from_json(ckpt["tokenizer"])
    scenes = game.random_bare_scenes(core.heldout_rng(0, salt=3, split=a.split), a.scenes)   # test: eval.py's
    figures = ceiling(brain, tokenizer, scenes, core.LINE_PROMPTS[a.prompts])
    print(f"{path} (batch {ckpt.get('batch')}), {a.scenes} held-out scenes ({a.split} split) at "
          f"{brain.cfg.img_size} px, {a.prompts} prompts")
    for name, value in figures.items():
        print(f"  {name:42s} {value:.3f}")


if __name__ == "__main__":
    core.main_guard(main)
