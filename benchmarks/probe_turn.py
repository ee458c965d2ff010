"""Where does reading "which way to turn" fail? Three read-outs of one brain's frozen image context.

The QA tutorial learns the positional families (is the gold left of the agent ...) but leaves "which way
to turn to face the gold" at chance among seven families (README, "Turn and ahead"). Turn needs the agent's
heading and the gold's direction together. On fresh bare scenes, with the brain's image encoder frozen:

  1. heading: how much of the heading's cosine and sine a linear read-out (ridge) finds in the keypoint
     token and in the mean of the patch tokens (R² on held-out scenes);
  2. mlp: a fresh MLP (two hidden layers of 256, Adam) on the keypoint token, trained on the turn label
     (inputs standardised across the training scenes unless --raw): held-out accuracy every --every steps;
  3. text_dec: the brain's text decoder alone (text_enc and the image side frozen), asked the turn question
     in its first training phrasing and trained on the answer tokens as the QA tutorial is; held-out forced
     accuracy (is the true answer likelier than the other). --standardise puts a BatchNorm on the keypoint
     token before the decoder's summary, --mlp-summary makes the summary a two-layer MLP, --fresh-decoder
     starts the decoder from random weights (its vocabulary head kept). The brain's own keypoint reader
     (core.KeypointReader, what came of --standardise --mlp-summary) stays frozen as the checkpoint has
     it: fresh, it adds nothing.

    python benchmarks/probe_turn.py --ckpt runs/curriculum/qa/best
    python benchmarks/probe_turn.py --ckpt runs/curriculum/qa/best --only text_dec --standardise --mlp-summary
    python benchmarks/probe_turn.py --ckpt runs/image/best --text runs/text/best     # parts from two stages
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import core  # noqa: E402
import game  # noqa: E402


class Standardise(nn.Module):
    """BatchNorm over the scenes of a batch, for a (B, 1, width) token."""

    def __init__(self, width):
        super().__init__()
        self.bn = nn.BatchNorm1d(width)

    def forward(self, token):
        return self.bn(token[:, 0])[:, None]


def ridge_r2(x, y, n_train):
    x = np.c_[x, np.ones(len(x))]
    w = np.linalg.solve(x[:n_train].T @ x[:n_train] + 1e-3 * np.eye(x.shape[1]), x[:n_train].T @ y[:n_train])
    err, test = x[n_train:] @ w - y[n_train:], y[n_train:]
    return 1 - (err ** 2).sum(0) / ((test - test.mean(0)) ** 2).sum(0)


def mlp_readout(x, y, n_train, a):
    x = torch.tensor(x, dtype=torch.float32)
    if not a.raw:
        x = (x - x[:n_train].mean(0)) / (x[:n_train].std(0) + 1e-6)
    y = torch.tensor(y, dtype=torch.float32)
    net = nn.Sequential(nn.Linear(x.shape[1], 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 1))
    opt = torch.optim.Adam(net.parameters(), a.lr)
    for step in range(1, a.steps + 1):
        i = torch.randint(0, n_train, (a.batch_size,))
        loss = F.binary_cross_entropy_with_logits(net(x[i])[:, 0], y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % a.every == 0:
            with torch.no_grad():
                acc = ((net(x[n_train:])[:, 0] > 0).float() == y[n_train:]).float().mean().item()
            print(f"mlp step {step}: loss {loss.item():.3f} | turn {acc:.2f}", flush=True)


def decoder_readout(brain, tok, scenes, contexts, n_train, a):
    dec = brain.text_dec
    if a.fresh_decoder:
        head = dec.head.state_dict()
        dec = core.TextDecoder(brain.cfg)
        dec.head.load_state_dict(head)
    w = brain.cfg.width
    if a.mlp_summary:
        dec.summary = nn.Sequential(nn.Linear(w, 4 * w), nn.GELU(), nn.Linear(4 * w, w))
    if a.standardise:
        dec.summary = nn.Sequential(Standardise(w), dec.summary)
    brain.text_dec = dec
    dec.requires_grad_(True)
    brain.reader.requires_grad_(False)           # the brain's own reader as it is: its statistics stay
    fam = core.QA_FAMILIES["turn"]

    def answer_loss(rows):
        """The answers' loss summed over each row's tokens, averaged over the rows."""
        answers = [fam["answers"][core.qa_label("turn", scenes[r])]["train"][0] for r in rows]
        text, _, amask = core.trim_padding(*tok.encode_qa([fam["questions"]["train"][0]] * len(rows), answers,
                                                          brain.cfg.seq_len))
        with torch.no_grad():
            text_tokens = brain.text_enc(text)
        return core.answer_token_loss(brain, text_tokens, contexts[rows], text, amask).sum() / len(rows)

    opt = torch.optim.AdamW(dec.parameters(), a.lr, weight_decay=0.01)
    rng = np.random.default_rng(a.seed)
    held = {"turn": scenes[n_train:]}
    for step in range(1, a.steps + 1):
        loss = answer_loss(rng.integers(n_train, size=a.batch_size))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % a.every == 0:
            dec.eval()
            acc = core.qa_forced_accuracy(brain, tok, held)["turn"]
            dec.train()
            print(f"text_dec step {step}: loss {loss.item():.3f} | turn (forced) {acc:.2f}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint (or run folder) with the image encoder, and the text "
                                                 "parts unless --text is given")
    p.add_argument("--text", help="checkpoint (or run folder) to take the text parts and tokenizer from")
    p.add_argument("--only", choices=["heading", "mlp", "text_dec"], help="run one read-out (default: all three)")
    p.add_argument("--scenes", type=int, default=3000, help="fresh bare scenes; the last --held-out are held out")
    p.add_argument("--held-out", type=int, default=500)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--raw", action="store_true", help="mlp: keypoint token as it is, not standardised")
    p.add_argument("--standardise", action="store_true", help="text_dec: BatchNorm on the keypoint token first")
    p.add_argument("--mlp-summary", action="store_true", help="text_dec: the summary as a two-layer MLP")
    p.add_argument("--fresh-decoder", action="store_true", help="text_dec: random weights but the vocabulary head")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if not 0 < a.held_out < a.scenes:
        p.error(f"--held-out must be between 0 and --scenes ({a.scenes}), got {a.held_out}")
    torch.manual_seed(a.seed)
    try:
        paths = [core.resolve_checkpoint(x) for x in [a.ckpt] + ([a.text] if a.text else [])]
        # the brain's sizes from the last checkpoint: its vocabulary follows the text pretraining's tokenizer
        brain = core.Brain(core.BrainConfig(**core.load_checkpoint(paths[-1])["config"]))
        tokenizer, _ = core.init_from(brain, paths, log=lambda *_: None)
    except core.CheckpointError as e:
        sys.exit(f"error: {e}")
    if not brain.cfg.keypoints:
        sys.exit("error: this brain has no keypoint token (--keypoints 0); nothing to read")
    brain.eval()
    for param in brain.parameters():
        param.requires_grad_(False)

    rng = np.random.default_rng(a.seed + 1)
    scenes = game.random_bare_scenes(rng, a.scenes)
    with torch.no_grad():
        contexts = torch.cat([brain.image_context(game.render(scenes[i: i + 500], brain.cfg.img_size))
                              for i in range(0, len(scenes), 500)])
    n_train = a.scenes - a.held_out
    turn = np.array([core.qa_label("turn", s) == "left" for s in scenes], float)
    print(f"{a.scenes} scenes ({a.held_out} held out); turn left in {turn.mean():.0%}", flush=True)
    keypoint_token = contexts[:, 0].numpy()
    if a.only in (None, "heading"):
        heading = np.array([[np.cos(s.heading), np.sin(s.heading)] for s in scenes])
        print(f"heading R² (cos, sin): keypoint token {np.round(ridge_r2(keypoint_token, heading, n_train), 3)} | "
              f"mean of the patch tokens {np.round(ridge_r2(contexts[:, 1:].mean(1).numpy(), heading, n_train), 3)}")
        spread = keypoint_token[:n_train]
        print(f"keypoint token per dimension: mean |mean| {np.abs(spread.mean(0)).mean():.3f}, "
              f"std across scenes {spread.std(0).mean():.3f}", flush=True)
    if a.only in (None, "mlp"):
        mlp_readout(keypoint_token, turn, n_train, a)
    if a.only in (None, "text_dec"):
        if tokenizer is None:
            sys.exit("error: no tokenizer in these checkpoints; give the text pretraining with --text")
        decoder_readout(brain, core.Tokenizer.from_json(tokenizer), scenes, contexts, n_train, a)


if __name__ == "__main__":
    main()
