"""Does the text side read the frame? A probe of the image-to-text path, apart from any stage's extras.

The brain (img_enc from an image-pretraining checkpoint, text_enc and text_dec from a text-pretraining one)
is asked one training question per family about fresh scenes, labels balanced, and only the label token right
after "<s> question <sep>" is scored, against the family's other label (a two-way softmax). img_enc and
text_dec train (AdamW, constant rate after a short warm-up); held-out accuracy per family is printed every
--every batches. The figures behind the keypoint token (core.Keypoints) and the QA stage's family order:

    python benchmarks/probe_reading.py --image IMG.pt --text TEXT.pt --families gold_left_right
    python benchmarks/probe_reading.py --image IMG.pt --text TEXT.pt --families gold_left_right --keypoints 0
    python benchmarks/probe_reading.py --image IMG.pt --text TEXT.pt --families all
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import core  # noqa: E402
import game  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", required=True, help="checkpoint (or run folder) that trained img_enc")
    p.add_argument("--text", required=True, help="checkpoint (or run folder) that trained text_enc, text_dec")
    p.add_argument("--families", nargs="+", default=["gold_left_right"], help="QA families, or 'all'")
    p.add_argument("--keypoints", type=int, default=None, help="override the keypoint count (0: no keypoint token)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=64, help="scenes per batch, shared by the families")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    families = list(core.QA_FAMILIES) if a.families == ["all"] else a.families
    text_ckpt = core.load_checkpoint(core.resolve_checkpoint(a.text))
    cfg = core.BrainConfig(**{**text_ckpt["config"], **({} if a.keypoints is None else {"keypoints": a.keypoints})})
    brain = core.Brain(cfg)
    image_ckpt = core.load_checkpoint(core.resolve_checkpoint(a.image))
    # image parts as far as they fit (a keypoint branch the checkpoint lacks keeps its initial weights)
    brain.load_state_dict({k: v for k, v in image_ckpt["model"].items() if k.startswith("img_")
                           and k in brain.state_dict() and v.shape == brain.state_dict()[k].shape}, strict=False)
    brain.load_state_dict({k: v for k, v in text_ckpt["model"].items() if k.startswith("text_")}, strict=False)
    tok = core.Tokenizer.from_json(text_ckpt["tokenizer"])

    asked = {}
    for f in families:
        labels = list(core.QA_FAMILIES[f]["answers"])
        prompt, n = core.qa_prompts(tok, core.QA_FAMILIES[f]["questions"]["train"][:1], cfg.seq_len)
        asked[f] = (labels, torch.tensor([tok.ids(" " + x)[0] for x in labels]), prompt[0, : int(n)])
    width = max(len(v[2]) for v in asked.values())

    def label_logits(f, scenes):
        labels, label_tokens, prompt = asked[f]
        text = torch.full((len(scenes), width), core.PAD)
        text[:, : len(prompt)] = prompt
        at = torch.full((len(scenes),), len(prompt) - 1)
        ctx = brain.image_context(game.render(scenes, cfg.img_size))
        y = torch.tensor([labels.index(core.qa_label(f, s)) for s in scenes])
        return brain.text_logits(text, ctx, at)[:, label_tokens], y

    params = list(brain.img_enc.parameters()) + list(brain.text_dec.parameters())
    opt = torch.optim.AdamW(params, a.lr, betas=(0.9, 0.95), weight_decay=0.01)
    rng = np.random.default_rng(a.seed + 1)
    held = {f: core.qa_scenes(100, core.heldout_rng(0, salt=9), families=[f])[f] for f in families}
    per = max(2, a.batch_size // len(families))
    t0 = time.time()
    for step in range(1, a.steps + 1):
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, step / 50)
        loss = sum(F.cross_entropy(*label_logits(f, core.qa_scenes(per, rng, families=[f])[f])) for f in families)
        opt.zero_grad()
        (loss / len(families)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % a.every == 0:
            with torch.no_grad():
                acc = {f: (lambda lg, y: (lg.argmax(1) == y).float().mean().item())(*label_logits(f, held[f]))
                       for f in families}
            print(f"batch {step} ({time.time() - t0:.0f} s): loss {loss.item() / len(families):.3f} | "
                  + " | ".join(f"{f} {v:.2f}" for f, v in acc.items()), flush=True)


if __name__ == "__main__":
    main()
