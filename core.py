"""core.py: the brain, its presets, the tokenizer, checkpoints and the run plumbing every stage shares.

Sections, top to bottom:
  presets      one table of sizes (tiny for the CPU, base = the original's brain)
  tokenizer    byte-level BPE with fixed special ids (padding has its own id; action and <sep> tokens)
  brain        img_enc, img_dec, text_enc, text_dec, value, and the calls the user knows by name
  checkpoints  atomic, weights-only, named <stage>_<UTC time>_batch<N>.pt, retention that never loses a run
  run          arguments, logging, seeding, devices, DDP, AMP, NaN guard, signals: the loop's plumbing
"""
import argparse
import contextlib
import dataclasses
import datetime
import difflib
import functools
import glob
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
import typing

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import game

# ---------------------------------------------------------------------------------------------
# presets


@dataclasses.dataclass
class BrainConfig:
    img_size: int = 96          # pixels per side of the frames the brain sees
    patch: int = 12             # pixels per side of one image token
    width: int = 128            # model width, shared by all parts so they can attend to each other
    img_heads: int = 4          # attention heads in the image parts
    img_enc_layers: int = 2     # image encoder blocks
    img_dec_layers: int = 1     # image decoder blocks (kept shallow: deep decoders did not learn positions)
    text_heads: int = 4         # attention heads in the text parts
    text_enc_layers: int = 2    # text encoder blocks (causal)
    text_dec_layers: int = 2    # text decoder blocks (causal, cross-attending to the image)
    value_heads: int = 2        # attention heads in the value head
    value_layers: int = 1       # value head blocks
    vocab: int = 2000           # tokenizer vocabulary, special tokens included
    seq_len: int = 32           # tokens per sentence, <s> and </s> included
    mlp_ratio: int = 4          # MLP hidden width / model width
    null_tokens: int = 4        # learned tokens standing for "no text" / "no image"
    keypoints: int = 24         # spatial-softmax heat maps of the image encoder, read out as one token (0: none)
    strokes: int = 1            # straight strokes the image decoder may paint over its patches (Strokes; 0: none)


PRESETS = {
    # gold radius 1/64 of the board is 1.5 px at 96 px: the smallest size that keeps it visible
    "tiny": BrainConfig(),
    "small": BrainConfig(img_size=128, patch=16, width=256, img_heads=8, img_enc_layers=4, img_dec_layers=2,
                         text_heads=8, text_enc_layers=4, text_dec_layers=2, value_heads=4, value_layers=2,
                         vocab=4000),
    "base": BrainConfig(img_size=224, patch=14, width=768, img_heads=12, img_enc_layers=6, img_dec_layers=3,
                        text_heads=6, text_enc_layers=8, text_dec_layers=4, value_heads=3, value_layers=4,
                        vocab=10000),
}

PARTS = ("img_enc", "img_dec", "text_enc", "text_dec", "reader", "value")
# The skill each stage teaches; a checkpoint lists every skill of the stages it descends from.
STAGE_SKILLS = {"pretrain_image": "image", "pretrain_text": "text", "trick_line": "line", "tutorial_qa": "qa",
                "rl_fake_traces": "agent", "rl_grpo": "agent"}


def make_config(preset, **overrides):
    """The preset's sizes with any overrides (None means keep); checks that they fit together."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cfg = dataclasses.replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})
    if cfg.img_size % cfg.patch:
        raise ValueError(f"img_size {cfg.img_size} is not a multiple of patch {cfg.patch}")
    for name in ("img_heads", "text_heads", "value_heads"):
        if cfg.width % getattr(cfg, name):
            raise ValueError(f"width {cfg.width} is not divisible by {name} {getattr(cfg, name)}")
    if cfg.null_tokens in (image_tokens := (cfg.img_size // cfg.patch) ** 2 + (cfg.keypoints > 0), 2 * image_tokens):
        raise ValueError(f"null_tokens {cfg.null_tokens} equals the tokens of an image context; the text decoder "
                         f"tells 'no image' by its length: choose another")
    if cfg.vocab <= len(SPECIALS):
        raise ValueError(f"vocab {cfg.vocab} must exceed the {len(SPECIALS)} special tokens")
    return cfg


# ---------------------------------------------------------------------------------------------
# tokenizer

# Fixed ids. Padding has its own id (the original reused <s>); actions and <sep> are reserved tokens.
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<img>", "<sep>", "<mask>"] + [f"<{a}>" for a in game.ACTION_NAMES]
PAD, BOS, EOS, UNK, IMG, SEP, MASK = range(7)
ACTION_TOKENS = [SPECIALS.index(f"<{a}>") for a in game.ACTION_NAMES]   # indexed by game action id


class Tokenizer:
    """Byte-level BPE (the `tokenizers` library) with SPECIALS at ids 0..; travels inside checkpoints as JSON."""

    def __init__(self, tok):
        self.tok = tok
        for i, s in enumerate(SPECIALS):
            if tok.token_to_id(s) != i:
                raise ValueError(f"tokenizer has {s!r} at id {tok.token_to_id(s)}, expected {i}")
        self.vocab = tok.get_vocab_size()

    @classmethod
    def train(cls, sentences, vocab):
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
        tok = HFTokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(sentences, trainer)
        return cls(tok)

    @classmethod
    def from_json(cls, text):
        from tokenizers import Tokenizer as HFTokenizer
        return cls(HFTokenizer.from_str(text))

    def to_json(self):
        return self.tok.to_str()

    def ids(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode(self, texts, seq_len, eos=True):
        """List of strings -> LongTensor (B, seq_len): <s> text </s> then <pad>, truncated to fit."""
        out = torch.full((len(texts), seq_len), PAD, dtype=torch.long)
        for i, enc in enumerate(self.tok.encode_batch(list(texts), add_special_tokens=False)):
            ids = [BOS] + enc.ids[: seq_len - 1 - eos] + ([EOS] if eos else [])
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def encode_qa(self, questions, answers, seq_len):
        """<s> question <sep> answer </s> <pad>...; returns (tokens, question_mask, answer_mask).
        question_mask marks <s>, the question and <sep>; answer_mask marks the answer tokens and </s>."""
        toks = torch.full((len(questions), seq_len), PAD, dtype=torch.long)
        qmask = torch.zeros_like(toks, dtype=torch.bool)
        amask = torch.zeros_like(qmask)
        for i, (q, a) in enumerate(zip(questions, answers)):
            qi = [BOS] + self.ids(q) + [SEP]
            ai = self.ids(a) + [EOS]
            if len(qi) + len(ai) > seq_len:
                raise ValueError(f"question and answer take {len(qi) + len(ai)} tokens, more than {seq_len}: {q!r} {a!r}")
            toks[i, : len(qi) + len(ai)] = torch.tensor(qi + ai)
            qmask[i, : len(qi)] = True
            amask[i, len(qi): len(qi) + len(ai)] = True
        return toks, qmask, amask

    def decode(self, ids):
        """Ids -> text, stopping at </s> and dropping the other special tokens."""
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        if EOS in ids:
            ids = ids[: ids.index(EOS)]
        return self.tok.decode([i for i in ids if i >= len(SPECIALS)]).strip()


# ---------------------------------------------------------------------------------------------
# brain


class Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x, ctx, causal=False, ctx_mask=None):
        B, T, W = x.shape
        q = self.q(x).view(B, T, self.heads, -1).transpose(1, 2)
        k, v = self.kv(ctx).view(B, ctx.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        mask = None if ctx_mask is None else ctx_mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, W))


class Block(nn.Module):
    """Pre-norm transformer block: self-attention, optional cross-attention to a context, MLP."""

    def __init__(self, width, heads, mlp_ratio, cross=False, causal=False):
        super().__init__()
        self.causal = causal
        self.ln1, self.attn = nn.LayerNorm(width), Attention(width, heads)
        self.ln2, self.cross = (nn.LayerNorm(width), Attention(width, heads)) if cross else (None, None)
        self.ln3 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x, ctx=None, ctx_mask=None):
        h = self.ln1(x)
        x = x + self.attn(h, h, causal=self.causal)
        if self.cross is not None:
            x = x + self.cross(self.ln2(x), ctx, ctx_mask=ctx_mask)
        return x + self.mlp(self.ln3(x))


def sincos_2d(grid, width):
    """Fixed 2D sin/cos position code for a grid x grid of image tokens, rows first (row = y)."""
    quarter = width // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter) / quarter))
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float), torch.arange(grid, dtype=torch.float), indexing="ij")
    parts = [f(c.reshape(-1, 1) * freq) for c in (y, x) for f in (torch.sin, torch.cos)]
    code = torch.cat(parts, dim=1)
    return F.pad(code, (0, width - code.shape[1]))


class Keypoints(nn.Module):
    """Where things are, as one token: a spatial softmax (Levine et al. 2016, "End-to-end training of deep
    visuomotor policies"). K heat maps over the frame at half resolution (a 3x3 convolution); for each, the
    expected x and y under its softmax and the heat expected there (its peak, when sharp): (3K,) numbers
    mapped linearly to one token. Half resolution keeps the gold (a few pixels, blended with the background)
    and costs a quarter: at full resolution this branch took 3x the time of the rest of the tiny encoder.

    Why: patch tokens say where an object is only by *which* token holds it, and a text decoder reads that
    only once its cross-attention has learned to pick that token out, while at the start its near-uniform
    attention averages all 64 tokens and the position is gone. Without it a tiny brain stayed at chance on
    "is the gold left or right of you?" for 400 batches (benchmarks/probe_reading.py). The keypoint token
    carries coordinates as numbers that even a uniform average passes on linearly, so a heat map that locks
    onto the gold or the eye is useful from the first batches: the same probe reached 99% in 300 batches
    (README, "The keypoint token"). Its peak says whether the thing is there at all.

    The heat maps start as colour detectors pointing in directions spread evenly over the colour sphere
    (a Fibonacci lattice): a heat map picks out the pixels whose colour lies furthest its way, so every
    colour of the scene has a few from the first batch (random directions left the gold, 9% of the sphere,
    without one in some seeds, and those brains stalled near 62%)."""

    def __init__(self, cfg):
        super().__init__()
        self.heat = nn.Conv2d(3, cfg.keypoints, 3, padding=1)
        with torch.no_grad():
            i = torch.arange(cfg.keypoints, dtype=torch.float) + 0.5
            polar, turn = torch.arccos(1 - 2 * i / cfg.keypoints), math.pi * (1 + 5 ** 0.5) * i
            directions = torch.stack([turn.cos() * polar.sin(), turn.sin() * polar.sin(), polar.cos()], 1)
            self.heat.weight.normal_(std=0.02)[:, :, 1, 1] += directions
            self.heat.bias.zero_()
        # sharp from the start: the few pixels of the gold must outweigh thousands of background pixels
        self.log_sharpness = nn.Parameter(torch.full((cfg.keypoints,), math.log(20.0)))
        self.token = nn.Linear(3 * cfg.keypoints, cfg.width)
        # at the scale of the patch tokens (which leave the encoder through a LayerNorm): a token 10x smaller
        # is read 10x less, and the probe took longer (seven families: 66% against 50% at batch 100)
        self.ln = nn.LayerNorm(cfg.width)
        half = torch.linspace(-1, 1, cfg.img_size // 2)
        y, x = torch.meshgrid(half, half, indexing="ij")
        self.register_buffer("xy", torch.stack([x.flatten(), y.flatten()], 1), persistent=False)   # (H*W, 2)

    def locate(self, ink):
        """(B, K, 2) expected (x, y) in [-1, 1] (x right, y down) of each heat map, (B, K, 1) its heat there."""
        heat = self.heat(F.avg_pool2d(ink, 2)).flatten(2).float()            # (B, K, H*W)
        p = torch.softmax(heat * self.log_sharpness.exp()[:, None], -1)
        return p @ self.xy, (p * heat).sum(-1, keepdim=True)

    def forward(self, ink):
        where, peak = self.locate(ink)
        return self.ln(self.token(torch.cat([where, peak], 2).flatten(1).to(ink.dtype)))[:, None]


class ImageEncoder(nn.Module):
    """Image -> tokens: the keypoint token first (when cfg.keypoints), then one token per patch."""

    def __init__(self, cfg):
        super().__init__()
        self.patchify = nn.Conv2d(3, cfg.width, cfg.patch, stride=cfg.patch)
        self.keypoints = Keypoints(cfg) if cfg.keypoints else None
        self.register_buffer("pos", sincos_2d(cfg.img_size // cfg.patch, cfg.width), persistent=False)
        self.tags = nn.Parameter(torch.randn(2, cfg.width) * 0.02)     # "first" and "second" image, two_img_context
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.img_heads, cfg.mlp_ratio) for _ in range(cfg.img_enc_layers))
        self.ln = nn.LayerNorm(cfg.width)

    def forward(self, img):
        ink = img * 2 - 1
        x = self.patchify(ink).flatten(2).transpose(1, 2) + self.pos
        for blk in self.blocks:
            x = blk(x)
        x = self.ln(x)
        if self.keypoints is None:
            return x
        # beside the patch tokens, not through the blocks: a linear path from the coordinates to the readers
        return torch.cat([self.keypoints(ink).to(x.dtype), x], 1)


class Drawn(typing.NamedTuple):
    """What the strokes painted, for the losses that teach them: their ends (B, strokes, 2, 2: x right, y down,
    board units), half-widths (B, strokes, board units), opacities (B, strokes), colours (B, strokes, 3), and
    where their two pointers looked: log-probabilities over the patches, rows first (B, strokes, 2, patches;
    None where not known, as for strokes made by hand)."""
    ends: torch.Tensor
    half_width: torch.Tensor
    opacity: torch.Tensor
    colour: torch.Tensor
    pointers: typing.Optional[torch.Tensor] = None


class Strokes(nn.Module):
    """Straight strokes painted over the decoder's patches. Each stroke runs between two pointers: an attention
    of a query (read from the keypoint token's place after the decoder blocks, which has read the text) over
    the patch tokens, the point being the attention-weighted mean of the patch centres, each moved by an
    offset its token proposes (where in the patch). The stroke is then trimmed at both ends by lengths read
    from the same token (a line runs from an object's rim, not its centre), which also gives its half-width,
    opacity and colour. paint() draws it; its opacity starts near zero, so a decoder that gains strokes
    rebuilds frames as before.

    Why: a patch token draws its 12x12 pixels through one linear map, and a 2 px bar at any angle and offset
    through a patch is not something that map learns in a few hundred batches: the tiny line trick painted the
    agent's and the gold's patches light blue and nothing between (IoU 0.041, drawing nothing 0.0195). A
    segment is known by its ends, and the ends of this one are where things are: pointing at the patch that
    holds the agent is a matter of matching its token. Taught where the ends of a line target's bar are
    (line_trick_loss), the same tiny line trick reached IoU 0.17-0.21 in 400 batches (README, "Strokes").
    On by default (cfg.strokes 1) since every stage after the line trick replays it into img_dec alone
    (line_replay_loss): the tiny curriculum then kept the line through every stage (final brain 0.198 and
    0.224 with held-back prompts in two seeds, drawing nothing 0.0195) and walked about as without strokes
    (greedy 52% and 44% at offset 0.3, random 18% and 22%); README, "Strokes". Its width, opacity and colour
    are taught from the bar's too (line_trick_loss): left to the pixels they hedged against ends a few pixels
    off, and the held-back IoU of the same tiny line trick went from 0.08-0.16 to 0.39-0.43 with them, square
    ends and a grammar of requests (README, "The stroke's look and a grammar of requests"). The QA tutorial,
    which moves the image features, loses the gold's pointer; the replay's cross-entropy on the pointers (off by
    default) finds it again in the agent stages (README, "Pointers that find the gold again")."""

    SHARPNESS = 4.0     # the pointers' attention logits x this over the usual 1/sqrt(width): sharper from the start

    def __init__(self, cfg):
        super().__init__()
        self.n, W = cfg.strokes, cfg.width
        self.ln_q, self.ln_k = nn.LayerNorm(W), nn.LayerNorm(W)
        self.query = nn.Linear(W, 2 * cfg.strokes * W)
        self.key = nn.Linear(W, W)
        self.offset = nn.Linear(W, 4 * cfg.strokes)
        self.style = nn.Linear(W, 7 * cfg.strokes)          # trims (2), half-width, opacity, colour (3)
        g = cfg.img_size // cfg.patch
        centre = (torch.arange(g, dtype=torch.float) + 0.5) / g
        y, x = torch.meshgrid(centre, centre, indexing="ij")
        self.register_buffer("centres", torch.stack([x.flatten(), y.flatten()], 1), persistent=False)   # (G*G, 2)
        self.pixel, self.patch = 1.0 / cfg.img_size, cfg.patch / cfg.img_size

    def forward(self, token, patches, img):
        """token (B, width), patches (B, G*G, width), img (B, 3, H, W) -> (img with the strokes painted over it,
        Drawn: their ends, widths, opacities, colours, and the pointers' log-probabilities over the patches)."""
        B, P, W = patches.shape
        token, patches = token.float(), patches.float()
        q = self.query(self.ln_q(token)).view(B, 2 * self.n, W)
        k = self.key(self.ln_k(patches))
        logp = torch.log_softmax(q @ k.transpose(1, 2) * (self.SHARPNESS / math.sqrt(W)), -1)   # (B, 2n, P)
        w = logp.exp()
        at = self.centres + self.patch * torch.tanh(self.offset(patches)).view(B, P, 2 * self.n, 2).transpose(1, 2)
        points = (w[..., None] * at).sum(2).view(B, self.n, 2, 2)
        s = self.style(token).view(B, self.n, 7)
        u = points[:, :, 1] - points[:, :, 0]
        u = u / u.norm(dim=-1, keepdim=True).clamp(min=1e-6)
        trim = self.pixel * F.softplus(s[..., 0:2] + 2.0)                   # about 2 px at first
        ends = torch.stack([points[:, :, 0] + trim[..., :1] * u, points[:, :, 1] - trim[..., 1:] * u], 2)
        half_width = self.pixel * F.softplus(s[..., 2] + 1.0)                # about a pixel at first
        opacity = torch.sigmoid(s[..., 3] - 4.0)                             # about 2% at first
        colour = torch.sigmoid(s[..., 4:7])
        drawn = Drawn(ends, half_width, opacity, colour, logp.view(B, self.n, 2, P))
        return paint(img, ends, half_width, opacity, colour), drawn


def paint(img, ends, half_width, opacity, colour):
    """Bars over images: img (B, 3, H, W); per bar (B, n, ...) its ends (2, 2) and half-width in board units
    (x right, y down), opacity and colour (3); painted in order, later over earlier. A pixel at distance d from
    a bar's axis is covered by opacity / (1 + (d / half-width)^2): half at the half-width, and a long tail, so a
    stroke near its target already feels which way to move. Past either end the cover falls the same way over
    half a pixel: a square end, as the game draws its bar (round ends, of the half-width's radius, added about
    17 pixels to a 165-pixel bar at 224 px, and took the IoU of a bar painted exactly where the target's is to
    0.86)."""
    H, W = img.shape[-2:]
    ys = ((torch.arange(H, device=img.device, dtype=torch.float) + 0.5) / H)[:, None]          # (H, 1)
    xs = ((torch.arange(W, device=img.device, dtype=torch.float) + 0.5) / W)[None, :]          # (1, W)
    end_soft = 0.5 / max(H, W)
    out = img.float()
    for k in range(ends.shape[1]):
        e = ends[:, k, :, :, None, None]                                    # (B, 2 ends, 2 coords, 1, 1)
        ax, ay, abx, aby = e[:, 0, 0], e[:, 0, 1], e[:, 1, 0] - e[:, 0, 0], e[:, 1, 1] - e[:, 0, 1]
        px, py = xs - ax, ys - ay                                            # (B, H, W) by broadcasting
        length = (abx * abx + aby * aby).clamp(min=1e-8).sqrt()
        along = (px * abx + py * aby) / length                              # from the first end, along the bar
        across = (px * aby - py * abx) / length                             # from the bar's axis
        past = (-along).clamp(min=0) + (along - length).clamp(min=0)        # beyond either end
        cover = (opacity[:, k, None, None] / (1 + (across / half_width[:, k, None, None]) ** 2)
                 / (1 + (past / end_soft) ** 2))
        out = out + cover[:, None] * (colour[:, k, :, None, None] - out)
    return out.to(img.dtype)


class ImageDecoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        # the "no text" context: learned rather than noise, so the image side gets the same input every time
        self.null_text = nn.Parameter(torch.randn(1, cfg.null_tokens, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.img_heads, cfg.mlp_ratio, cross=True)
                                    for _ in range(cfg.img_dec_layers))
        self.ln = nn.LayerNorm(cfg.width)
        self.unpatchify = nn.Linear(cfg.width, 3 * cfg.patch ** 2)
        self.strokes = Strokes(cfg) if cfg.strokes else None

    def forward(self, img_tokens, ctx, ctx_mask=None, ends=False, strokes=True):
        """The image (B, 3, H, W); with ends, (image, Drawn: what the strokes drew, or None). Without
        strokes (or cfg.strokes 0) none are painted."""
        x = img_tokens
        for blk in self.blocks:
            x = blk(x, ctx, ctx_mask)
        p, g = self.cfg.patch, self.cfg.img_size // self.cfg.patch
        img = self.unpatchify(self.ln(x[:, -g * g:])).view(-1, g, g, 3, p, p)     # the patch tokens (keypoints first)
        img = img.permute(0, 3, 1, 4, 2, 5).reshape(-1, 3, g * p, g * p)
        drawn = None
        if strokes and self.strokes is not None:     # the strokes read the keypoint token's place (the mean token without keypoints)
            img, drawn = self.strokes(x[:, 0] if self.cfg.keypoints else x.mean(1), x[:, -g * g:], img)
        return (img, drawn) if ends else img


class TextEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg.vocab, cfg.width)
        self.pos_emb = nn.Parameter(torch.randn(1, cfg.seq_len, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.text_heads, cfg.mlp_ratio, causal=True)
                                    for _ in range(cfg.text_enc_layers))
        self.ln = nn.LayerNorm(cfg.width)

    def forward(self, text):
        x = self.tok_emb(text) + self.pos_emb[:, : text.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.ln(x)


class KeypointReader(nn.Module):
    """The brain's "reader" part: an image context's keypoint token standardised, dimension by dimension, then
    an MLP, added to every text position of text_dec beside its linear summary (Brain.decode). Zero at
    first (its last layer starts at zero), so a brain that gains it answers as before; "no image" is never
    read, so text alone is the same with or without it.

    Why: the keypoint token holds the agent's heading (a ridge regression reads its cos and sin with R² 0.97),
    and a fresh MLP on it learns "which way should you turn to face the gold?" (86% in 400 steps), but the
    text decoder, reading the token through its linear summary and its cross-attention, stayed at chance
    (50%) through 1,400 steps. On bare scenes the token barely moves from scene to scene against its constant
    part (per dimension: mean |mean| 0.61 against a spread of 0.32 in the QA brain); standardised across the
    scenes, the same text decoder read the turn (85% in 400 steps). benchmarks/probe_turn.py measures all
    three; README, "Turn and ahead".

    The statistics are running averages (the first batches averaged evenly, then with weight `momentum`),
    learned with the weights: updated after each forward pass with gradients, in training, of a stage that
    trains the reader (never under torch.no_grad, so rollouts and evaluation do not move them), and used in
    training as in acting: unlike a BatchNorm's batch statistics, a row's output never depends on the other
    rows of its batch, so scoring a trace gives the probabilities it was sampled with, and a batch of one acts
    as a batch of many. They follow the scenes of the stage that trains it (bare scenes in the QA tutorial):
    statistics of image pretraining's scenes with walls left the turn at chance. DDP averages them over ranks
    at each step."""

    def __init__(self, width, momentum=0.05, eps=1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("var", torch.ones(width))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))     # batches observed
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    @torch.no_grad()
    def observe(self, token):
        """Fold a batch of keypoint tokens (B, width) into the running mean and variance (B >= 2)."""
        if len(token) < 2:
            return
        t = token.detach().float()
        w = (1.0 / (self.seen + 1).float()).clamp(min=self.momentum)
        self.mean.lerp_(t.mean(0), w)
        self.var.lerp_(t.var(0, unbiased=False), w)
        self.seen += 1

    def forward(self, token):
        return self.mlp(((token.float() - self.mean) * torch.rsqrt(self.var + self.eps)).to(token.dtype))


class TextDecoder(nn.Module):
    """Text tokens -> next-token logits, cross-attending to a context (an image's tokens, or "no image").

    The context's first token (an image's keypoint token; the first "no image" token) is also added, through
    a linear map, to every text position before the blocks: the MLPs then see where things are at full
    weight beside the question, instead of 1/65 of it through a cross-attention that starts near uniform.
    With it the reading probe (benchmarks/probe_reading.py) learned "is the gold left or right of you?" in
    half the batches (93% at batch 100 against 65%), and seven families asked at once began to move, where
    without it they stayed at chance (README, "The keypoint token"). Beside it, the KeypointReader: the same
    token standardised across scenes, through an MLP (a part of its own: Brain.reader), which is what lets
    the decoder read the heading."""

    def __init__(self, cfg):
        super().__init__()
        self.null_img = nn.Parameter(torch.randn(1, cfg.null_tokens, cfg.width) * 0.02)   # the "no image" context
        self.summary = nn.Linear(cfg.width, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.text_heads, cfg.mlp_ratio, cross=True, causal=True)
                                    for _ in range(cfg.text_dec_layers))
        self.ln = nn.LayerNorm(cfg.width)
        self.head = nn.Sequential(nn.Linear(cfg.width, cfg.width), nn.GELU(), nn.Linear(cfg.width, cfg.vocab))

    def forward(self, text_tokens, ctx, positions=None, read=None):
        """Logits (B, T, vocab); with positions (B,), only those at each row's position: (B, vocab); with a
        (B, T) bool mask, those where it is True, row by row: (N, vocab). The vocabulary head is the largest
        matrix product of a small text model, so a loss on a few positions should ask for those alone.
        read: (B, 1, width) the keypoint reader's reading of an image context (Brain.decode), added beside
        the summary."""
        x = text_tokens + self.summary(ctx[:, :1])
        if read is not None:
            x = x + read
        for blk in self.blocks:
            x = blk(x, ctx)
        if positions is not None:
            x = x[positions] if positions.dtype == torch.bool else x[torch.arange(len(x), device=x.device), positions]
        return self.head(self.ln(x))


class ValueHead(nn.Module):
    """"Dopamine": how good the situation is, one scalar per text position."""

    def __init__(self, cfg):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.value_heads, cfg.mlp_ratio, cross=True, causal=True)
                                    for _ in range(cfg.value_layers))
        self.ln = nn.LayerNorm(cfg.width)
        self.out = nn.Linear(cfg.width, 1)

    def forward(self, text_tokens, ctx):
        x = text_tokens
        for blk in self.blocks:
            x = blk(x, ctx)
        return self.out(self.ln(x)).squeeze(-1)


@dataclasses.dataclass
class Sample:
    tokens: torch.Tensor     # (B, seq_len) prompt + sampled tokens, <pad> after </s>
    lengths: torch.Tensor    # (B,) tokens in use
    logprobs: torch.Tensor   # (B, n) log-prob of each sampled token (0 once a row has ended)
    entropies: torch.Tensor  # (B, n) entropy of each sampling distribution (0 once ended)
    sampled: torch.Tensor    # (B, n) bool: a token was really sampled at this step


class Brain(nn.Module):
    """One transformer brain: the image and text sides attend to each other; a value head judges."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.img_enc, self.img_dec = ImageEncoder(cfg), ImageDecoder(cfg)
        self.text_enc, self.text_dec = TextEncoder(cfg), TextDecoder(cfg)
        self.reader = KeypointReader(cfg.width)
        self.value = ValueHead(cfg)
        self.apply(self._init)
        nn.init.zeros_(self.reader.mlp[-1].weight)      # the reader adds nothing until it has learned

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def parts(self):
        return {name: getattr(self, name) for name in PARTS}

    # -- contexts
    def image_context(self, img):
        return self.img_enc(img)

    def two_img_context(self, img1, img2):
        """Two images as one context, each tagged so the text side can tell them apart."""
        tags = self.img_enc.tags
        return torch.cat([self.img_enc(img1) + tags[0], self.img_enc(img2) + tags[1]], dim=1)

    def null_image(self, batch):
        return self.text_dec.null_img.expand(batch, -1, -1)

    def null_text(self, batch):
        return self.img_dec.null_text.expand(batch, -1, -1)

    def decode(self, text_tokens, ctx, positions=None):
        """text_dec's logits (positions as in TextDecoder.forward), with the reader's reading of an image context.
        "No image" is told by its length (make_config keeps it apart from an image's) and not read."""
        read = None
        if ctx.shape[1] != self.cfg.null_tokens:
            read = self.reader(ctx[:, :1])
            if self.training and torch.is_grad_enabled() and self.reader.mlp[0].weight.requires_grad:
                self.reader.observe(ctx[:, 0])    # after its use: scored with grad as it was sampled without
        return self.text_dec(text_tokens, ctx, positions, read)

    # -- the calls the user knows by name
    def forward(self, text, img):
        """Text logits that see the image, and an image rebuilt from its tokens and the whole text."""
        img_tokens, text_tokens = self.img_enc(img), self.text_enc(text)
        logits = self.decode(text_tokens, img_tokens)
        recon = self.img_dec(img_tokens, text_tokens, text != PAD)
        return logits, recon

    def draw(self, text, img, encoders_learn=True):
        """forward's image alone, with what the strokes drew: (image, Drawn or None). With encoders_learn False
        the encoders' features come without gradient: img_dec alone learns from it."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and encoders_learn):
            features = self.img_enc(img), self.text_enc(text)
        return self.img_dec(*features, text != PAD, ends=True)

    def qa_forward(self, text, img, question_mask):
        """The text side sees question and answer (causally); the image is rebuilt from the question only."""
        img_tokens, text_tokens = self.img_enc(img), self.text_enc(text)
        logits = self.decode(text_tokens, img_tokens)
        recon = self.img_dec(img_tokens, text_tokens, question_mask & (text != PAD))
        return logits, recon

    def img_autoencoder(self, img):
        """Rebuild the image with the learned "no text" context, and no strokes: no text asks for one (painted
        there too, the tiny curriculum's 3-minute image pretraining got through 384 batches instead of 506)."""
        return self.img_dec(self.img_enc(img), self.null_text(img.shape[0]), strokes=False)

    def sentence_autoencoder(self, text):
        """Next-token logits with the learned "no image" context."""
        return self.decode(self.text_enc(text), self.null_image(text.shape[0]))

    def text_logits(self, text, ctx, positions=None):
        """Next-token logits seeing a context; with positions ((B,) indices or a (B, T) mask), only those."""
        return self.decode(self.text_enc(text), ctx, positions)

    def evaluate_text(self, text, ctx):
        """The value head: one scalar per position of the text, seeing the context (an image's tokens)."""
        return self.value(self.text_enc(text), ctx)

    @staticmethod
    def _dist(logits, temperature, allowed):
        logits = logits.float() / temperature
        if allowed is not None:
            keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            keep[torch.as_tensor(allowed, device=logits.device)] = True
            logits = logits.masked_fill(~keep, float("-inf"))
        logp = F.log_softmax(logits, dim=-1)
        entropy = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)
        return logp, entropy

    def compute_probabilities(self, text, ctx, temperature=1.0, allowed=None):
        """Log-prob and entropy of each given token text[:, t+1], read from the logits at position t,
        which see only text[:, :t+1] (the original read them at a position that could see the token).
        Returns (logprobs, entropies), each (B, T-1)."""
        logp, entropy = self._dist(self.text_logits(text, ctx)[:, :-1], temperature, allowed)
        return logp.gather(-1, text[:, 1:, None]).squeeze(-1), entropy

    @torch.no_grad()
    def extend(self, text, lengths, ctx, temperature=1.0, allowed=None, generator=None, active=None, greedy=False):
        """Add one token after each row's first `lengths` tokens: sampled with the temperature (or the most
        likely one when greedy). Only active rows are computed, over the longest active prefix.
        Returns (text, lengths, logprob, entropy, active); inactive rows are unchanged, logprob/entropy 0."""
        B = text.shape[0]
        active = torch.ones(B, dtype=torch.bool, device=text.device) if active is None else active
        active = active & (lengths < text.shape[1])
        logprob = torch.zeros(B, device=text.device)
        entropy = torch.zeros(B, device=text.device)
        text = text.clone()
        idx = active.nonzero().squeeze(1)
        if len(idx):
            at = lengths[idx]
            logits = self.text_logits(text[idx, : int(at.max())], ctx[idx], at - 1)
            logp, ent = self._dist(logits, temperature, allowed)
            token = logp.argmax(-1) if greedy else torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
            text[idx, at] = token
            logprob[idx] = logp.gather(1, token[:, None]).squeeze(1)
            entropy[idx] = ent
        return text, lengths + active.long(), logprob, entropy, active

    @torch.no_grad()
    def generate(self, text, lengths, ctx, max_new, temperature=1.0, allowed=None, generator=None, greedy=False):
        """Sample (or, greedy, pick) up to max_new tokens after each prompt, stopping a row at </s>."""
        active = torch.ones(text.shape[0], dtype=torch.bool, device=text.device)
        logps, ents, sampled = [], [], []
        for _ in range(max_new):
            if not active.any():
                break
            text, new_lengths, lp, ent, did = self.extend(text, lengths, ctx, temperature, allowed, generator,
                                                          active, greedy)
            ended = did & (text.gather(1, (new_lengths - 1)[:, None]).squeeze(1) == EOS)
            lengths, active = new_lengths, did & ~ended
            logps.append(lp), ents.append(ent), sampled.append(did)
        stack = lambda xs, dtype: torch.stack(xs, 1) if xs else torch.zeros(text.shape[0], 0, dtype=dtype)
        return Sample(text, lengths, stack(logps, torch.float), stack(ents, torch.float), stack(sampled, torch.bool))

    def greedy(self, text, lengths, ctx, max_new, allowed=None):
        """The most likely continuation, stopping a row at </s>; returns (text, lengths)."""
        sample = self.generate(text, lengths, ctx, max_new, allowed=allowed, greedy=True)
        return sample.tokens, sample.lengths


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


def rss_mb():
    """Resident memory of this process in MiB (Linux), for watching leaks across rounds. Free heap pages are
    handed back to the system first (glibc's malloc_trim): otherwise freed-but-kept pages, whose amount
    follows the sizes of recent rounds, rise in steps of 10-15 MiB that look like a leak and are not."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


# ---------------------------------------------------------------------------------------------
# checkpoints

FORMAT = "brain-checkpoint-1"


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message says which file and why."""


def checkpoint_name(stage, batch, when=None):
    when = when or datetime.datetime.now(datetime.timezone.utc)
    return f"{stage}_{when:%Y%m%dT%H%M%S}{when.microsecond // 1000:03d}Z_batch{batch:08d}.pt"


def parse_checkpoint_name(path):
    """(stage, batch) from a checkpoint file name, or None for other files."""
    name = os.path.basename(path)
    if not name.endswith(".pt") or "_batch" not in name:
        return None
    head, _, batch = name[:-3].rpartition("_batch")
    stage = head.rsplit("_", 1)[0]
    return (stage, int(batch)) if batch.isdigit() and "_" in head else None


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, flushed and fsynced, then renamed over `path`:
    a kill at any instant leaves either the old file or the new one, whole."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint safely (weights_only: no arbitrary code); CheckpointError says what is wrong."""
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder; give a checkpoint file, or the folder with --resume")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        text = str(e)
        if "Unsupported global" in text:
            raise CheckpointError(f"{path} holds arbitrary pickled objects and was refused "
                                  f"(only plain tensors and data are loaded)") from None
        raise CheckpointError(f"{path} is truncated, corrupt or not a checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this project")
    return ckpt


def list_checkpoints(run_dir):
    """[(batch, stage, path)] of the checkpoint files in run_dir, oldest batch first."""
    found = []
    for path in glob.glob(os.path.join(run_dir, "*.pt")):
        parsed = parse_checkpoint_name(path)
        if parsed:
            found.append((parsed[1], parsed[0], path))
    return sorted(found)


def latest_checkpoint(run_dir, stage=None, log=print):
    """The newest checkpoint in run_dir that loads; corrupt ones are reported and skipped."""
    for batch, st, path in reversed(list_checkpoints(run_dir)):
        if stage is not None and st != stage:
            continue
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            log(f"warning: skipping {e}")
    return None, None


def resolve_checkpoint(spec):
    """A file; a run folder (its newest valid checkpoint); or FOLDER/best, FOLDER/latest."""
    folder, name = os.path.split(spec)
    if os.path.isdir(spec):
        folder, name = spec, "latest"
    if name == "best" and os.path.isdir(folder or "."):
        best = sorted(glob.glob(os.path.join(folder or ".", "*_best.pt")))
        if not best:
            raise CheckpointError(f"{folder} holds no best checkpoint")
        return best[-1]
    if name == "latest" and os.path.isdir(folder or "."):
        path, _ = latest_checkpoint(folder or ".")
        if path is None:
            raise CheckpointError(f"{folder} holds no valid checkpoint")
        return path
    return spec


class Keeper:
    """Retention: keep the last K saves, every M-th batch, and the best by the stage's held-out metric
    (hard-linked as <stage>_best.pt). Only files this run wrote, listed in checkpoints.json, are ever deleted."""

    def __init__(self, run_dir, stage, keep_last=3, keep_every=0, mode="min"):
        self.run_dir, self.stage, self.keep_last, self.keep_every, self.mode = run_dir, stage, keep_last, keep_every, mode
        self.manifest_path = os.path.join(run_dir, "checkpoints.json")
        self.manifest = {"written": [], "best": None, "best_metric": None}
        if os.path.exists(self.manifest_path):
            with open(self.manifest_path) as f:
                self.manifest = json.load(f)

    def better(self, metric):
        best = self.manifest["best_metric"]
        return metric is not None and math.isfinite(metric) and (
            best is None or (metric < best if self.mode == "min" else metric > best))

    def save(self, payload, batch, metric=None):
        path = os.path.join(self.run_dir, checkpoint_name(self.stage, batch))
        atomic_save(payload, path)
        name = os.path.basename(path)
        self.manifest["written"].append(name)
        if self.better(metric):
            self.manifest["best"], self.manifest["best_metric"] = name, metric
            best = os.path.join(self.run_dir, f"{self.stage}_best.pt")
            tmp = best + ".tmp"
            if os.path.exists(tmp):
                os.remove(tmp)
            os.link(path, tmp)          # a hard link: deleting the batch file later never loses the best
            os.replace(tmp, best)
        self._prune()
        self._write_manifest()
        return path

    def _prune(self):
        written = self.manifest["written"]
        keep = set(written[-self.keep_last:]) if self.keep_last > 0 else set(written)
        keep.add(self.manifest["best"])
        for name in written:
            batch = parse_checkpoint_name(name)[1]
            if self.keep_every and batch % self.keep_every == 0:
                keep.add(name)
        for name in [n for n in written if n not in keep]:
            path = os.path.join(self.run_dir, name)
            if os.path.exists(path):
                os.remove(path)
            written.remove(name)

    def _write_manifest(self):
        tmp = self.manifest_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.manifest, f, indent=1)
        os.replace(tmp, self.manifest_path)


def rng_state():
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]   # weights_only-safe
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# What a config written before a field existed meant by it (a brain then had no strokes).
ABSENT_MEANS = {"strokes": 0}


def config_mismatch(a, b, fields):
    """The fields that differ, as "name: a vs b"; a field b's config lacks means ABSENT_MEANS."""
    get = lambda c, f: c.get(f, ABSENT_MEANS.get(f))
    return [f"{f}: {get(a, f)} vs {get(b, f)}" for f in fields if get(a, f) != get(b, f)]


# Which config fields shape each part's weights, to name a mismatch clearly.
PART_FIELDS = {
    "img_enc": ("img_size", "patch", "width", "img_heads", "img_enc_layers", "mlp_ratio", "keypoints"),
    "img_dec": ("img_size", "patch", "width", "img_heads", "img_dec_layers", "mlp_ratio", "null_tokens", "keypoints",
                "strokes"),
    "text_enc": ("width", "text_heads", "text_enc_layers", "mlp_ratio", "vocab", "seq_len"),
    "text_dec": ("width", "text_heads", "text_dec_layers", "mlp_ratio", "vocab", "null_tokens"),
    "reader": ("width",),
    "value": ("width", "value_heads", "value_layers", "mlp_ratio"),
}


def load_weights(module, state, what):
    """load_state_dict, with a CheckpointError naming the weights that differ (a checkpoint of an older brain)."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        names = [f"missing {k}" for k in missing[:3]] + [f"unexpected {k}" for k in unexpected[:3]]
        raise CheckpointError(f"{what} does not have this brain's weights ({', '.join(names)}): it was written by "
                              f"another version of core.py; retrain that stage")


# What only resuming a run needs in a checkpoint; load_brain drops it.
RESUME_ONLY = ("optimizer", "rng", "cursor")


def load_brain(spec):
    """A checkpoint (file, run folder or FOLDER/best) as (brain in eval mode on the CPU, the checkpoint's other
    contents, its path). What only resuming needs (optimizer, rng, cursor) is dropped: a base checkpoint's
    optimizer state is twice its weights. Weights that do not fit their config are a CheckpointError."""
    path = resolve_checkpoint(spec)
    ckpt = load_checkpoint(path)
    try:
        brain = Brain(BrainConfig(**ckpt["config"]))
        load_weights(brain, ckpt.pop("model"), path)
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: its weights do not fit its config ({type(e).__name__})") from None
    for key in RESUME_ONLY:
        ckpt.pop(key, None)
    return brain.eval(), ckpt, path


def init_from(brain, paths, log=print):
    """Take each part from the (last) checkpoint that trained it: image parts from image pretraining,
    text parts and the tokenizer from text pretraining. Returns (tokenizer json or None, origins)."""
    cfg = dataclasses.asdict(brain.cfg)
    origins, tokenizer = {}, None
    for path in paths:
        path = resolve_checkpoint(path)
        ckpt = load_checkpoint(path)
        trained = ckpt.get("trained_parts", [])
        for part in trained:
            bad = config_mismatch(cfg, ckpt["config"], PART_FIELDS[part])
            if bad:
                raise CheckpointError(f"{path}: its {part} does not fit this brain ({'; '.join(bad)}); "
                                      f"use the same --preset and sizes as the run that wrote it")
            prefix = part + "."
            sub = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
            load_weights(getattr(brain, part), sub, f"{path}: its {part}")
            origins[part] = f"{ckpt['stage']} ({os.path.basename(path)})"
        if ckpt.get("tokenizer") and (tokenizer is None or {"text_enc", "text_dec"} & set(trained)):
            tokenizer = ckpt["tokenizer"]
        log(f"init-from {path}: took {', '.join(trained) or 'nothing'}")
    if tokenizer is not None and Tokenizer.from_json(tokenizer).vocab != brain.cfg.vocab:
        raise CheckpointError(f"the tokenizer in --init-from has vocabulary {Tokenizer.from_json(tokenizer).vocab}, "
                              f"this brain {brain.cfg.vocab}")
    return tokenizer, origins


# ---------------------------------------------------------------------------------------------
# evaluation helpers every stage shares


# Held-out data comes in two splits. "val": what the stages evaluate while they train, and so choose their best
# checkpoint by (and their --forgetting-limit by); "test": what eval.py and the benchmarks report. Before the
# thirtieth session both were one set, and a stage's best was chosen on the first scenes of the very set its
# figures were then reported on (README, "Validation and test scenes").
HELDOUT_SPLITS = {"test": 1, "val": 2}


def _check_split(split, who):
    if split not in HELDOUT_SPLITS:
        raise ValueError(f"{who}: split must be one of {', '.join(HELDOUT_SPLITS)}, not {split!r}")


def heldout_rng(i, salt=0, split="test"):
    """Generators for held-out data: their seed sequences start with 1 (test) or 2 (val, HELDOUT_SPLITS),
    training's (Run.rng) with 0, so held-out scenes are never drawn in training nor shared by the splits."""
    _check_split(split, "heldout_rng")
    return np.random.default_rng([HELDOUT_SPLITS[split], salt, i])


def heldout_sentences(sentences, split):
    """The text pretraining's held-out sentences (they travel in every checkpoint) of one split, in their order:
    "val" is the half (rounded up) whose seeded hash is smallest, "test" the rest. Membership depends on the set
    only, so every stage and eval.py split a checkpoint's sentences alike, earlier sessions' checkpoints too. A
    single sentence cannot be split: it serves both."""
    _check_split(split, "heldout_sentences")
    sentences = list(sentences or [])
    if len(sentences) < 2:
        return sentences
    ranked = sorted(set(sentences), key=lambda s: hashlib.blake2b(s.encode(), key=b"val/test", digest_size=8).digest())
    val = set(ranked[: (len(ranked) + 1) // 2])
    return [s for s in sentences if (s in val) == (split == "val")]


# The colours an image may hold, for reading a reconstruction back into objects.
PALETTE = dict(zip(("background", "wall", "line", "gold", "agent", "eye"), game.PALETTE))


def colour_classes(img):
    """(B, 3, H, W) in [0, 1] -> (B, H, W) index of the nearest PALETTE colour."""
    palette = torch.tensor(list(PALETTE.values()), dtype=torch.float, device=img.device) / 255
    dist = ((img.float().clamp(0, 1)[:, None] - palette[None, :, :, None, None]) ** 2).sum(2)
    return dist.argmin(1)


def object_recovery(recon, target, objects=("agent", "eye", "gold", "wall"), threshold=0.5):
    """For each object: the share of frames holding it where at least `threshold` of its pixels are
    reconstructed in its colour (nearest palette colour), so a brain that blurs the gold away shows it."""
    names = list(PALETTE)
    want, got = colour_classes(target), colour_classes(recon)
    out = {}
    for obj in objects:
        mask = want == names.index(obj)
        pixels = mask.flatten(1).sum(1)
        hit = (mask & (got == names.index(obj))).flatten(1).sum(1)
        present = pixels > 0
        ok = (hit[present].float() / pixels[present]) >= threshold
        out[obj] = ok.float().mean().item() if present.any() else float("nan")
    return out


def save_image_grid(rows, path, scale=2):
    """Write rows of (B, 3, H, W) image batches as one PNG: row r, column b is rows[r][b]."""
    from PIL import Image
    grid = torch.cat([torch.cat(list(r.detach().float().clamp(0, 1).cpu()), dim=2) for r in rows], dim=1)
    pixels = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(pixels)
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# agent: the brain as a policy in the game (shared by rl_fake_traces, rl_grpo and eval)

# The policy's vocabulary: the four moves and </s>, which ends an episode. No-op is left out: it wastes an action.
POLICY_ACTIONS = (game.FORWARD, game.BACKWARD, game.LEFT, game.RIGHT)
POLICY_TOKENS = [ACTION_TOKENS[a] for a in POLICY_ACTIONS] + [EOS]


@dataclasses.dataclass
class Rollout:
    """B episodes. Step t of episode b saw states[t][b] and the trace text[b, :t+1], and chose text[b, t+1]."""
    states: list            # per step, the B Settings before the action
    text: torch.Tensor      # (B, seq_len) <s> then one token per step (an action, or </s>)
    taken: torch.Tensor     # (B, T) bool: episode b took a step at t
    logprobs: torch.Tensor  # (B, T) log-prob of the token under the sampling policy (0 for oracle / random)
    labels: torch.Tensor    # (B, T) the oracle's action token for the state of each step, whatever was taken
    success: torch.Tensor   # (B,) bool: the gold was reached
    steps: torch.Tensor     # (B,) steps taken

    def to(self, device):
        """The same episodes with their tensors on `device` (a rollout made in a data worker, on the CPU)."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                                            if f.name != "states"})

    def flat(self):
        """The (episode, step) pairs taken: (Settings list, episode index, step index) for re-scoring."""
        b, t = self.taken.nonzero(as_tuple=True)
        return [self.states[i][j] for j, i in zip(b.tolist(), t.tolist())], b, t


def rollout(settings, policy, size, device, max_actions=game.MAX_ACTIONS, seq_len=32, brain=None,
            temperature=1.0, generator=None, backward=False, explore=0.0):
    """Play B games to the gold or to max_actions. policy: "sample" or "greedy" (the brain), "oracle", "random".
    explore: the share of the brain's steps where a uniformly random move is taken instead (their logprobs
    are then not the policy's: for imitation's DAgger episodes only, not for policy gradients).
    Frames are rendered on `device` and not kept: the rollout stores Settings, and training re-renders."""
    B = len(settings)
    env = game.GameBatch(settings, device)
    text = torch.full((B, seq_len), PAD, dtype=torch.long, device=device)
    text[:, 0] = BOS
    lengths = torch.ones(B, dtype=torch.long, device=device)
    active = torch.ones(B, dtype=torch.bool, device=device)
    success = torch.zeros(B, dtype=torch.bool, device=device)
    taken, logprobs, labels, states = [], [], [], []
    action_tokens = torch.tensor(ACTION_TOKENS, device=device)
    rows = torch.arange(B, device=device)
    policy_tokens = torch.tensor(POLICY_TOKENS, device=device)
    token_action = torch.full((len(SPECIALS),), game.NOOP, dtype=torch.long, device=device)
    token_action[ACTION_TOKENS] = torch.arange(len(ACTION_TOKENS), device=device)
    for t in range(min(max_actions, seq_len - 1)):
        if not active.any():
            break
        states.append(env.to_settings())
        labels.append(action_tokens[env.oracle_actions(backward)])
        logp = torch.zeros(B, device=device)
        if policy in ("sample", "greedy"):
            with torch.no_grad():
                idx = active.nonzero().squeeze(1)
                img_tokens = brain.image_context(env.render(size)[idx])
                ctx = img_tokens.new_zeros(B, *img_tokens.shape[1:])
                ctx[idx] = img_tokens                      # finished games are neither encoded nor extended
                text, _, logp, _, _ = brain.extend(text, lengths, ctx, temperature, POLICY_TOKENS, generator,
                                                   active, greedy=policy == "greedy")
            if explore > 0:
                swap = active & (torch.rand(B, generator=generator, device=device) < explore)
                pick = torch.randint(len(POLICY_ACTIONS), (B,), generator=generator, device=device)
                text[rows[swap], lengths[swap]] = policy_tokens[pick[swap]]
        elif policy == "oracle":
            text[rows, lengths] = labels[-1]
        elif policy == "random":
            pick = torch.randint(len(POLICY_ACTIONS), (B,), generator=generator, device=device)
            text[rows, lengths] = policy_tokens[pick]
        else:
            raise ValueError(f"unknown policy {policy!r}")
        token = text[rows, lengths]
        text[~active, lengths[~active]] = PAD
        moves = torch.where(active & (token != EOS), token_action[token.clamp(max=len(SPECIALS) - 1)], game.NOOP)
        reward = env.step(moves)
        taken.append(active.clone())
        logprobs.append(torch.where(active, logp, torch.zeros_like(logp)))
        lengths = lengths + active.long()
        success |= active & (reward > 0)
        active = active & (token != EOS) & (reward == 0)
    stack = lambda xs, dtype: torch.stack(xs, 1) if xs else torch.zeros(B, 0, dtype=dtype, device=device)
    taken = stack(taken, torch.bool)
    return Rollout(states, text, taken, stack(logprobs, torch.float), stack(labels, torch.long), success, taken.sum(1))


def score_actions(brain, states, text, steps, size, temperature=1.0, targets=None):
    """Log-prob and entropy of the token each step chose, read causally: step t's token text[b, t+1] from the
    logits at position t, with the frame of step t as context. states: the Settings of each (b, t) pair;
    text: (N, seq_len) each pair's episode text; steps: (N,) t; targets: (N,) tokens to score instead of the
    ones taken (e.g. the oracle's labels of the states the brain itself visited)."""
    frames = game.render(states, size, text.device)
    # causal: tokens after the longest step are not needed
    logits = brain.text_logits(text[:, : int(steps.max()) + 1], brain.image_context(frames), steps)
    rows = torch.arange(len(steps), device=text.device)
    logp, entropy = brain._dist(logits, temperature, POLICY_TOKENS)
    targets = text[rows, steps + 1] if targets is None else targets
    return logp.gather(1, targets[:, None]).squeeze(1), entropy


# The agent stages train the parts the policy uses (img_enc, text_enc, text_dec, reader) and img_dec, which the
# plain reconstruction that keeps the image skills needs (keeping_loss).
AGENT_PARTS = ["img_enc", "img_dec", "text_enc", "text_dec", "reader"]


def agent_scenes(offset, n, salt=0, split="test"):
    """Held-out bare scenes at one max_agent_offset: split "val" the same for every stage, "test" for eval.py
    and the benchmarks."""
    return [game.random_bare_settings(heldout_rng(i, salt=1000 + salt, split=split), max_agent_offset=offset)
            for i in range(n)]


@torch.no_grad()
def evaluate_agent(brain, size, device, offsets=(0.1, 0.2, 0.3, 0.5), n=100, baselines=True, seed=0, split="test"):
    """Success within MAX_ACTIONS and mean actions to the gold on held-out scenes (agent_scenes of `split`:
    "val" in the stages, "test" in eval.py), greedy and sampled,
    beside the baselines measured on the same scenes in the same run: the forward-only oracle ("oracle"), the
    oracle that may also reverse ("oracle_backward": a gold behind the agent costs it far fewer turns) and a
    uniformly random policy. Each policy draws from its own generator, seeded by the seed, the offset and the
    policy: the random baseline plays the same actions whatever brain is measured beside it."""
    out = {}
    names = ["greedy", "sample", "oracle", "oracle_backward", "random"]
    policies = names[:2 if brain is not None else 0] + (names[2:] if baselines else [])
    for offset in offsets:
        scenes = agent_scenes(offset, n, salt=int(offset * 100), split=split)
        for policy in policies:
            gen = torch.Generator(device=device)
            gen.manual_seed(seed * 100_000 + round(offset * 1000) * 10 + names.index(policy))
            backward = policy == "oracle_backward"
            r = rollout(scenes, "oracle" if backward else policy, size, device, brain=brain, generator=gen,
                        backward=backward)
            out[f"{policy}_success@{offset}"] = r.success.float().mean().item()
            out[f"{policy}_actions@{offset}"] = r.steps[r.success].float().mean().item() if r.success.any() else float("nan")
    return out


# ---------------------------------------------------------------------------------------------
# run: arguments, devices, logging, the training step and its guards


class UsageError(Exception):
    """Bad input from the user: printed as one clear line, never a traceback."""


def main_guard(main):
    """Run a stage's main(), turning known errors into one line on stderr and exit status 2."""
    try:
        main()
    except (UsageError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def at_least(minimum):
    """An argparse type: a whole number no smaller than minimum, else the flag's error names the problem
    (a --steps of 0 or a --replay-sentences of -1 would otherwise fail later, deep in the run, or run nothing)."""
    def whole_number(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, not {value}")
        return value
    return whole_number


def in_range(low, high=math.inf, low_open=False, high_open=False):
    """An argparse type: a number in [low, high] (open at either end on request), else the flag's error names the
    problem (a --temperature of 0 would divide by zero in the first rollout, a --dagger of 1.5 would run as 1,
    a negative weight would train away from a skill)."""
    if high == math.inf:
        wanted = f"more than {low:g}" if low_open else f"{low:g} or more"
    else:
        wanted = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def number(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below and math.isfinite(value)):             # NaN fails both; inf is no setting
            raise argparse.ArgumentTypeError(f"must be {wanted}, not {text}")
        return value
    return number


def stage_parser(description, **defaults):
    """The arguments every stage shares (each with help); a stage adds its own and sets its defaults."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r = p.add_argument_group("run")
    r.add_argument("--gpu", type=at_least(0), default=None, help="CUDA device index (shorthand for --device cuda:N)")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:N; default: cuda if present, else cpu")
    r.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="brain size preset")
    r.add_argument("--run-dir", default=None, help="folder for checkpoints and logs (default runs/<stage>)")
    r.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --run-dir")
    r.add_argument("--init-from", nargs="+", default=None, metavar="CKPT",
                   help="start from earlier stages: each part from the checkpoint that trained it")
    r.add_argument("--seed", type=int, default=0, help="seed of every random thing in the run")
    r.add_argument("--steps", type=at_least(1), default=1000, help="batches to train in all")
    r.add_argument("--time-limit", type=in_range(0), default=0,
                   help="also stop after this many minutes of training (0: none)")
    r.add_argument("--batch-size", type=at_least(1), default=32, help="samples per batch (per process under torchrun)")
    r.add_argument("--lr", type=in_range(0, low_open=True), default=3e-4,
                   help="peak learning rate of every trained part")
    for part in PARTS:
        r.add_argument(f"--lr-{part.replace('_', '-')}", type=in_range(0, low_open=True), default=None,
                       help=f"learning rate of {part} (default --lr)")
    r.add_argument("--freeze", nargs="*", default=[], type=frozen_name, metavar="PART[.MODULE]",
                   help="parts this stage must not train, or modules of a part (e.g. img_enc.blocks: the rest of "
                        "img_enc trains)")
    r.add_argument("--warmup", type=at_least(0), default=100, help="batches of linear learning-rate warm-up")
    r.add_argument("--min-lr-frac", type=in_range(0, 1), default=0.1, help="cosine decay ends at this fraction of --lr")
    r.add_argument("--weight-decay", type=in_range(0), default=0.01, help="AdamW weight decay")
    r.add_argument("--grad-clip", type=in_range(0), default=1.0, help="clip the gradient norm to this (0: off)")
    r.add_argument("--log-every", type=at_least(0), default=20, help="batches between log lines")
    r.add_argument("--eval-every", type=at_least(0), default=200, help="batches between held-out evaluations (and saves)")
    r.add_argument("--save-every", type=at_least(0), default=100, help="batches between checkpoints")
    r.add_argument("--keep-last", type=at_least(0), default=3, help="checkpoints kept besides the best and every M-th")
    r.add_argument("--keep-every", type=at_least(0), default=0, help="also keep every checkpoint whose batch is a multiple of this")
    r.add_argument("--max-bad-steps", type=at_least(1), default=5,
                   help="consecutive non-finite losses before rolling back to the last good checkpoint")
    r.add_argument("--amp", default="none", choices=["none", "bf16"], help="mixed precision")
    r.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    s = p.add_argument_group("brain sizes (default: the preset's)")
    for f in dataclasses.fields(BrainConfig):
        smallest = 0 if f.name in ("keypoints", "strokes") else 1        # 0 of those: none
        s.add_argument(f"--{f.name.replace('_', '-')}", type=at_least(smallest), default=None,
                       help=f"override the preset's {f.name}")
    p.set_defaults(**defaults)
    return p


def pick_device(args, local_rank=None):
    """--device, or --gpu N, or under torchrun the process's own GPU; cuda when present, else the CPU."""
    want = "cuda" if args.gpu is not None else args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(want)
    except RuntimeError:
        raise UsageError(f"--device {want!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type != "cuda":
        return device
    index = args.gpu if args.gpu is not None else device.index if device.index is not None else (local_rank or 0)
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= n:
        raise UsageError(f"--gpu {index}: there is no such GPU (this machine has {n} CUDA device{'s' * (n != 1)})")
    return torch.device("cuda", index)


def batch_rng(seed, rank, batch):
    """The numpy generator of one training batch: a function of (seed, rank, batch) alone, so a resumed run
    and any number of data workers draw exactly the same data."""
    return np.random.default_rng([0, seed, rank, batch])


def _worker_init():
    """A data worker: one torch thread, and deaf to Ctrl-C, which the terminal sends to the whole process group:
    the training process saves and stops, and a worker killed in the middle of a batch would leave it waiting."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def add_workers_arg(parser):
    parser.add_argument("--workers", type=at_least(-1), default=-1,
                        help="processes drawing the next batches' scenes while the device trains (-1: 4 on a GPU, "
                             "0 on a CPU: there the brain's step is the slow part)")


def _batch_scenes(batch, draw, keep, seed, rank):
    """draw(rng) and keeping_scenes(rng, **keep) of one batch, from the batch's scene stream: a function of
    (seed, rank, batch) alone, apart from run.rng()'s, which the main process draws the rest from."""
    rng = np.random.default_rng([1, seed, rank, batch])
    return draw(rng), keeping_scenes(rng, **(keep or {}))


class Prefetcher:
    """Makes the data of the next batches in worker processes while the device trains on this one.
    fn(batch) must depend on the batch number alone (see batch_rng), so the data never depends on workers."""

    def __init__(self, fn, workers, ahead=4):
        self.fn, self.ahead, self.pending = fn, ahead, {}
        self.pool = None
        if workers > 0:
            import multiprocessing
            self.pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_init)

    def get(self, batch):
        if self.pool is None:
            return self.fn(batch)
        for b in range(batch, batch + self.ahead):
            if b not in self.pending:
                self.pending[b] = self.pool.apply_async(self.fn, (b,))
        for b in [b for b in self.pending if b < batch]:       # a rollback or resume moved the cursor
            del self.pending[b]
        return self.pending.pop(batch).get()

    def close(self):
        if self.pool is not None:
            self.pool.terminate()


def lr_factor(batch, warmup, steps, min_frac):
    """Linear warm-up, then cosine decay to min_frac; a function of the batch number alone, so resume is exact."""
    if batch < warmup:
        return (batch + 1) / warmup
    progress = min(1.0, (batch - warmup) / max(1, steps - warmup))
    return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * progress))


class Run:
    """The plumbing of one stage: devices and DDP, run folder, log, brain and optimizer, resume, guarded steps,
    checkpoints. A stage script keeps its data, loss and evaluation in sight and calls these."""

    def __init__(self, stage, args, trains, mode="min"):
        self.stage, self.args, self.mode = stage, args, mode
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else None
        self.device = pick_device(args, local)
        if self.world > 1:
            import torch.distributed as dist
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.run_dir = args.run_dir or os.path.join("runs", stage)
        self._check_run_dir()
        self.keeper = Keeper(self.run_dir, stage, args.keep_last, args.keep_every, mode)
        self.log_file = open(os.path.join(self.run_dir, "train.log"), "a") if self.rank == 0 else None
        self.metrics_file = open(os.path.join(self.run_dir, "metrics.jsonl"), "a") if self.rank == 0 else None
        self.batch, self.cursor, self.skipped, self.bad_in_row = 0, {}, 0, 0
        self.stop_signal, self.last_saved = None, None
        self.timers, self._tick = {}, (time.time(), 0)
        self.prefetchers = []                      # prefetch_scenes' worker pools, closed by close()
        self.trains = [p for p in trains if p not in args.freeze]        # whole parts; freeze_modules the rest

        self.ckpt = None
        if args.resume:
            path, self.ckpt = latest_checkpoint(self.run_dir, stage, log=self.log)
            self.log(f"resuming from {path} at batch {self.ckpt['batch']}" if self.ckpt else
                     f"--resume: no checkpoint in {self.run_dir} yet, starting fresh")
        if self.ckpt:
            self.cfg = BrainConfig(**self.ckpt["config"])
        else:
            overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(BrainConfig)}
            self.cfg = make_config(args.preset, **overrides)
        # what travels from checkpoint to checkpoint besides weights: the tokenizer, the held-out sentences
        # of text pretraining (so later stages and eval.py measure forgetting on them), the skills trained
        inherited = self.ckpt or self._inherit(args.init_from)
        self.tokenizer = Tokenizer.from_json(inherited["tokenizer"]) if inherited.get("tokenizer") else None
        self.heldout_text = inherited.get("heldout_text")
        self.skills = sorted(set(inherited.get("skills", [])) | ({STAGE_SKILLS[stage]} if stage in STAGE_SKILLS else set()))
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    # -- set-up
    def _check_run_dir(self):
        os.makedirs(self.run_dir, exist_ok=True)
        stages = {st for _, st, _ in list_checkpoints(self.run_dir)}
        if stages - {self.stage}:
            raise UsageError(f"{self.run_dir} holds checkpoints of another stage ({', '.join(sorted(stages))}); "
                             f"give this stage its own --run-dir")
        if stages and not self.args.resume:
            raise UsageError(f"{self.run_dir} already holds {self.stage} checkpoints; pass --resume to continue, "
                             f"or choose another --run-dir (nothing was overwritten)")

    @staticmethod
    def _inherit(paths):
        out = {"skills": []}
        for path in paths or []:
            ckpt = load_checkpoint(resolve_checkpoint(path))
            out["skills"] += ckpt.get("skills", [])
            if ckpt.get("tokenizer"):
                out["tokenizer"], out["heldout_text"] = ckpt["tokenizer"], ckpt.get("heldout_text")
        return out

    def build(self, tokenizer=None):
        """The brain on the device, with its optimizer; resumed or initialised from earlier stages."""
        args = self.args
        if tokenizer is not None:
            self.tokenizer = tokenizer
            if tokenizer.vocab != self.cfg.vocab:
                if self.ckpt:
                    raise CheckpointError(f"tokenizer vocabulary {tokenizer.vocab} does not match the checkpoint's {self.cfg.vocab}")
                self.cfg = dataclasses.replace(self.cfg, vocab=tokenizer.vocab)
        torch.manual_seed(args.seed)       # the same initial weights on every rank
        brain = Brain(self.cfg)
        self.origins = {}
        if self.ckpt:
            load_weights(brain, self.ckpt["model"], "the checkpoint to resume")
            self.origins = self.ckpt.get("origins", {})
        elif args.init_from:
            _, self.origins = init_from(brain, args.init_from, log=self.log)
        for name, part in brain.parts().items():
            part.requires_grad_(name in self.trains)
        freeze_modules(brain, [f for f in args.freeze if "." in f])
        brain.to(self.device)
        if args.compile:
            for m in brain.modules():
                if isinstance(m, Block):
                    m.compile()
        groups = []
        for name in self.trains:
            lr = getattr(args, f"lr_{name}") or args.lr
            params = [p for p in getattr(brain, name).parameters() if p.requires_grad]
            decay = [p for p in params if p.dim() >= 2]
            other = [p for p in params if p.dim() < 2]
            groups += [dict(params=decay, weight_decay=args.weight_decay, base_lr=lr, part=name),
                       dict(params=other, weight_decay=0.0, base_lr=lr, part=name)]
        self.opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
        if self.ckpt:
            self.opt.load_state_dict(self.ckpt["optimizer"])
            set_rng_state(self.ckpt["rng"])
            self.batch, self.cursor, self.skipped = self.ckpt["batch"], self.ckpt["cursor"], self.ckpt.get("skipped", 0)
            self.last_saved = self.batch
        self.brain = brain
        self._log_config()
        self._tick = (time.time(), 0)      # samples/s counts from here, not from the set-up
        return brain

    def _log_config(self):
        sizes = {name: count_parameters(part) for name, part in self.brain.parts().items()}
        config = {"stage": self.stage, "args": vars(self.args), "brain": dataclasses.asdict(self.cfg),
                  "parameters": sizes, "trains": self.trains, "origins": self.origins, "device": str(self.device),
                  "world_size": self.world, "torch": torch.__version__}
        self.log("config " + json.dumps(config, default=str))

    def _on_signal(self, signum, frame):
        if self.stop_signal:                       # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.stop_signal = signal.Signals(signum).name
        self.log(f"{self.stop_signal} received: saving a checkpoint after this batch, then stopping")

    # -- data helpers
    def prefetch_scenes(self, draw, keep=None):
        """A Prefetcher whose get(batch) gives (draw(rng), keeping_scenes(rng, **keep)) for that batch: the Python
        work of making scenes (a scene is drawn in about a millisecond, and the QA tutorial draws hundreds a
        batch to balance its rarest fact), done ahead in --workers processes. draw must be picklable (a
        module's function, or a functools.partial of one); the data never depends on the number of workers."""
        workers = self.args.workers if self.args.workers >= 0 else (4 if self.device.type == "cuda" else 0)
        self.prefetchers.append(Prefetcher(functools.partial(
            _batch_scenes, draw=draw, keep=keep, seed=self.args.seed, rank=self.rank), workers))
        return self.prefetchers[-1]

    def rng(self, batch=None):
        """The numpy generator of one training batch: a function of (seed, rank, batch), so resume replays nothing."""
        return batch_rng(self.args.seed, self.rank, self.batch if batch is None else batch)

    def torch_generator(self, batch=None):
        g = torch.Generator(device=self.device)
        g.manual_seed(int(self.rng(batch).integers(2 ** 62)))
        return g

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.amp == "bf16")

    @contextlib.contextmanager
    def timing(self, key):
        """Accumulate the seconds spent in a block (e.g. making data), reported as a share in the log."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = time.time()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.timers[key] = self.timers.get(key, 0.0) + time.time() - t

    # -- the loop
    def batches(self):
        """Batch numbers from where the run stands to --steps; stops cleanly after SIGTERM / Ctrl-C."""
        self.started = time.time()
        while self.batch < self.args.steps and not self.stop_signal and not self.out_of_time():
            yield self.batch
        if self.last_saved != self.batch:
            self.save()
        if self.stop_signal:
            self.log(f"stopped by {self.stop_signal} at batch {self.batch}")
            return
        if self.rank == 0:          # curriculum.sh skips a stage whose run folder says it finished
            with open(os.path.join(self.run_dir, "finished.json"), "w") as f:
                json.dump({"batch": self.batch, "best": self.keeper.manifest["best"],
                           "best_metric": self.keeper.manifest["best_metric"]}, f)
        self.log(f"finished {self.batch} batches; checkpoints in {self.run_dir}")

    def step(self, loss, accumulated=False, advance=True):
        """Backward and update, unless the loss or the gradients are not finite: then the step is skipped and
        counted, and after --max-bad-steps in a row the run rolls back to its last good checkpoint.
        accumulated: the caller already ran backward on the pieces of `loss` (gradient accumulation).
        advance: count a batch (a stage taking several optimizer steps per batch passes False but for the last)."""
        ok = bool(torch.isfinite(loss.detach()))
        if ok and not accumulated:
            loss.backward()
        params = [p for g in self.opt.param_groups for p in g["params"]]
        if self.world > 1:
            ok = self._all_reduce(params, ok)
            self._sync_statistics()
        norm = torch.nn.utils.clip_grad_norm_(params, self.args.grad_clip or float("inf")) if ok else None
        if ok and torch.isfinite(norm):
            for g in self.opt.param_groups:
                g["lr"] = g["base_lr"] * lr_factor(self.batch, self.args.warmup, self.args.steps, self.args.min_lr_frac)
            self.opt.step()
            self.bad_in_row = 0
        else:
            ok = False
            self.skipped += 1
            self.bad_in_row += 1
            self.log(f"batch {self.batch}: non-finite loss or gradient, step skipped ({self.skipped} so far)")
            if self.bad_in_row >= self.args.max_bad_steps:
                self.rollback()
        self.opt.zero_grad(set_to_none=True)
        self.batch += advance
        return ok

    def _all_reduce(self, params, ok):
        """Average gradients over ranks (one flat buffer); a step is taken only if every rank's loss was finite."""
        import torch.distributed as dist
        flag = torch.tensor([1.0 if ok else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item() == 0:
            return False
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset: offset + g.numel()].view_as(g).clone()
            offset += g.numel()
        return True

    def _sync_statistics(self):
        """Average the running statistics the brain keeps (KeypointReader's) over ranks, as the gradients are."""
        import torch.distributed as dist
        reader = self.brain.reader
        for buf in (reader.mean, reader.var):
            dist.all_reduce(buf)
            buf /= self.world

    def rollback(self):
        path, ckpt = latest_checkpoint(self.run_dir, self.stage, log=self.log)
        if ckpt is None:
            raise UsageError(f"{self.bad_in_row} non-finite steps in a row and no checkpoint to roll back to; "
                             f"lower --lr or check the data")
        self.brain.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.bad_in_row = 0
        self.log(f"rolled back weights and optimizer to {path} (batch {ckpt['batch']}); "
                 f"continuing at batch {self.batch} with new data")

    def due(self, every):
        return every > 0 and self.batch % every == 0

    def out_of_time(self):
        return self.args.time_limit > 0 and time.time() - self.started > 60 * self.args.time_limit

    def final(self):
        """The batch just taken is the run's last (--steps or --time-limit reached): time for a last evaluation."""
        return self.batch >= self.args.steps or self.out_of_time()

    # -- logging and saving
    def log(self, message):
        if self.rank != 0:
            return
        line = f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S} {self.stage} {message}"
        print(line, flush=True)
        if getattr(self, "log_file", None):
            self.log_file.write(line + "\n")
            self.log_file.flush()

    def record(self, kind, values):
        """One JSON line in metrics.jsonl, for plots."""
        if self.rank == 0:
            self.metrics_file.write(json.dumps({"kind": kind, "batch": self.batch, "time": time.time(), **values}) + "\n")
            self.metrics_file.flush()

    def log_step(self, values, samples):
        """Every --log-every batches: batch, losses, samples/s, ETA, and the share of time in each timer."""
        self._samples = getattr(self, "_samples", 0) + samples * self.world
        if not self.due(self.args.log_every):
            return
        t0, _ = self._tick
        elapsed = max(time.time() - t0, 1e-9)
        rate = self._samples / elapsed
        batches_per_s = self.args.log_every / elapsed
        eta = datetime.timedelta(seconds=int((self.args.steps - self.batch) / max(batches_per_s, 1e-9)))
        shares = {f"{k}_share": v / elapsed for k, v in self.timers.items()}
        values = {k: float(v) for k, v in values.items()}
        text = " | ".join(f"{k} {v:.4g}" for k, v in {**values, **shares}.items())
        self.log(f"batch {self.batch}/{self.args.steps} | {text} | {rate:.1f} samples/s | eta {eta}")
        self.record("train", {**values, **shares, "samples_per_s": rate, "skipped": self.skipped})
        self._tick, self._samples, self.timers = (time.time(), 0), 0, {}

    def save(self, metrics=None, metric=None):
        """A checkpoint of everything needed to continue; `metric` (held-out, lower is better unless mode='max')
        decides the best. In a skill stage (--forgetting-limit, add_forgetting_args) a checkpoint whose plain
        reconstruction passed the limit (metrics' plain_mse_ratio) is chosen only when none stayed within it
        (past_forgetting_limit). Only rank 0 writes."""
        self.last_saved = self.batch
        if metrics:
            self.record("eval", metrics)
            self.log("eval " + " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in metrics.items()))
        limit = getattr(self.args, "forgetting_limit", 0)
        if metric is not None and self.mode == "max" and past_forgetting_limit(metrics, limit):
            self.log(f"plain reconstruction x{metrics['plain_mse_ratio']:.3f} of before the stage, past "
                     f"--forgetting-limit {limit:g}: the best only if no checkpoint stays within it")
            metric = -metrics["plain_mse_ratio"]      # mode 'max': below every skill, the least forgetting first
        if self.rank == 0:
            payload = {
                "format": FORMAT, "stage": self.stage, "batch": self.batch, "time": time.time(),
                "preset": self.args.preset, "config": dataclasses.asdict(self.cfg),
                "model": {k: v.detach().cpu() for k, v in self.brain.state_dict().items()},
                "optimizer": self.opt.state_dict(), "rng": rng_state(), "cursor": self.cursor,
                "args": {k: v for k, v in vars(self.args).items()},
                "tokenizer": self.tokenizer.to_json() if self.tokenizer else None,
                "metrics": metrics or {}, "trained_parts": self.trains, "origins": self.origins,
                "skipped": self.skipped, "skills": self.skills, "heldout_text": self.heldout_text,
            }
            path = self.keeper.save(payload, self.batch, metric)
            self.log(f"saved {path}")
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()

    def close(self):
        for prefetcher in self.prefetchers:
            prefetcher.close()
        if self.world > 1:
            import torch.distributed as dist
            dist.destroy_process_group()
        for f in (self.log_file, self.metrics_file):
            if f:
                f.close()


# ---------------------------------------------------------------------------------------------
# skills: the line trick and the QA tutorial
# What trick_line.py and tutorial_qa.py teach, and how eval.py measures it: the prompts and question
# families with their phrasings (training and held back), labels from game.scene_facts, the answer
# parser, and the metrics (line IoU and geometry, QA accuracy beside chance, forgetting).

# "Draw the line" prompts. The held-back ones are never trained on, and none of them is among the text
# pretraining's game sentences, so they test whether the brain understood the request, not a string.
LINE_PROMPTS = {
    "train": ["Please draw the straight line to the gold from the agent.",
              "Draw a line from the agent to the gold.",
              "Draw the blue line to the gold.",
              "Connect the agent to the gold with a line.",
              "Show me the way to the gold with a line.",
              "Please draw a line from you to the gold.",
              "Draw a straight line between the agent and the gold.",
              "Mark the path from the agent to the gold in blue."],
    "heldout": ["Could you draw a line joining the agent and the gold?",
                "Link the green agent and the yellow gold with a blue line.",
                "Trace a straight blue path from you to the gold."],
}
# "Draw the line" requests from a small grammar, added to the eight hand-written ones (twenty-second session):
# frames x verbs x what is drawn x between what. With eight prompts against the text model's own sentences,
# the tiny line trick drew for half the held-back prompts or fewer; the grammar varies the request's words
# independently, so that what is learned is "a request to draw a line to the gold", not eight strings. None
# of its frames or verbs is a held-back prompt's ("Could you", "joining", "Link", "Trace", "path"), and a
# prompt that reads more like a held-back prompt than any hand-written one does is dropped (README, "The
# stroke's look and a grammar of requests").
_LINE_FRAMES = ["{V} {n} {e}.", "Please {v} {n} {e}.", "{V} {n} {e}, please.", "Now {v} {n} {e}.",
                "I want you to {v} {n} {e}.", "Can you {v} {n} {e}?"]
_LINE_VERBS = ["draw", "paint", "sketch", "make"]
_LINE_NOUNS = ["a line", "the line", "a straight line", "a blue line", "one blue line"]
_LINE_BETWEEN = ["from the agent to the gold", "from you to the gold", "between the agent and the gold",
                 "between you and the gold", "from the gold to the agent", "to the gold"]


def closeness(a, b):
    """How alike two phrasings read, 0 to 1 (difflib's ratio of matching characters)."""
    return difflib.SequenceMatcher(None, a, b).ratio()


def line_prompt_grammar():
    """The grammar's requests, in a fixed order."""
    return [f.format(V=v.capitalize(), v=v, n=n, e=e)
            for f in _LINE_FRAMES for v in _LINE_VERBS for n in _LINE_NOUNS for e in _LINE_BETWEEN]


def _add_line_prompts(prompts):
    """prompts["train"] += the grammar's requests, less those already there and those that read more like a
    held-back prompt than any hand-written training prompt does."""
    nearest = {h: max(closeness(h, p) for p in prompts["train"]) for h in prompts["heldout"]}
    taken = set(prompts["train"] + prompts["heldout"])
    prompts["train"] += [p for p in line_prompt_grammar() if p not in taken
                         and all(closeness(h, p) <= nearest[h] for h in prompts["heldout"])]


_add_line_prompts(LINE_PROMPTS)


# how much more a line pixel weighs than the rest in the line trick's loss (line_trick_loss)
LINE_PIXEL_WEIGHT = 20.0


def check_init_parts(origins, tokenizer, parts, stage):
    """A skill stage starts from pretrained parts: name what --init-from did not provide."""
    missing = [p for p in parts if p not in origins] + ([] if tokenizer else ["a tokenizer"])
    if missing:
        raise UsageError(f"{stage} needs pretrained {', '.join(parts)} and a tokenizer; --init-from gave none for "
                         f"{', '.join(missing)} (pass the image and the text pretraining checkpoints)")


def line_mask(img):
    """(B, 3, H, W) -> (B, H, W) bool: pixels whose nearest palette colour is the line's blue."""
    return colour_classes(img) == list(PALETTE).index("line")


def principal_axis(mask):
    """Each image's masked pixels along their principal axis: (centre (B, 2) x, y in pixels, angle of the axis in
    [-pi/2, pi/2], lowest and highest position along it (B,) in pixels from the centre, pixel count (B,))."""
    H, W = mask.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float, device=mask.device),
                            torch.arange(W, dtype=torch.float, device=mask.device), indexing="ij")
    m = mask.float()
    n = m.sum((1, 2))
    safe = n.clamp(min=1)
    mx, my = (m * xs).sum((1, 2)) / safe, (m * ys).sum((1, 2)) / safe
    dx, dy = xs - mx[:, None, None], ys - my[:, None, None]
    cxx, cyy, cxy = (m * dx * dx).sum((1, 2)) / safe, (m * dy * dy).sum((1, 2)) / safe, (m * dx * dy).sum((1, 2)) / safe
    angle = 0.5 * torch.atan2(2 * cxy, cxx - cyy)
    along = dx * torch.cos(angle)[:, None, None] + dy * torch.sin(angle)[:, None, None]
    hi = along.masked_fill(~mask, -float("inf")).amax((1, 2))
    lo = along.masked_fill(~mask, float("inf")).amin((1, 2))
    return torch.stack([mx, my], 1), angle, lo, hi, n


def line_geometry(mask):
    """Principal axis of each image's blue pixels: (angle in [-pi/2, pi/2], length in pixels, pixel count).
    The angle is an axis (a segment has no direction); the length is the pixels' extent along it."""
    _, angle, lo, hi, n = principal_axis(mask)
    return angle, torch.where(n > 0, hi - lo + 1, torch.zeros_like(n)), n


def line_scores(pred, target, min_pixels=3, min_length=5):
    """Per-image line scores of predicted against target frames: IoU of blue pixels (1 when both have none),
    whether a line was drawn (>= min_pixels blue), and, where one was drawn and the true line is at least
    min_length px long, the angle error (degrees) and the length error (board units) of its principal axis."""
    p, t = line_mask(pred), line_mask(target)
    inter, union = (p & t).flatten(1).sum(1).float(), (p | t).flatten(1).sum(1).float()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    pa, pl, pn = line_geometry(p)
    ta, tl, _ = line_geometry(t)
    found = pn >= min_pixels
    d = (pa - ta).abs() % math.pi
    angle_err = torch.rad2deg(torch.minimum(d, math.pi - d))
    length_err = (pl - tl).abs() / pred.shape[-1]
    measurable = found & (tl >= min_length)
    return dict(iou=iou, found=found, angle_err=angle_err, length_err=length_err, measurable=measurable)


def mean_line_iou(targets):
    """IoU of the best fixed picture: the pixels that are blue in at least a share s of the targets, with the
    best s. The 'mean line' baseline: what a brain that ignores the scene could draw at best."""
    t = line_mask(targets)
    freq = t.float().mean(0)
    best = 0.0
    for s in freq[freq > 0].unique()[-64:]:
        p = (freq >= s)[None]
        inter, union = (p & t).flatten(1).sum(1).float(), (p | t).flatten(1).sum(1).float()
        best = max(best, (inter / union.clamp(min=1)).mean().item())
    return best


@torch.no_grad()
def line_metrics(brain, tokenizer, settings_list, prompts, chunk=64):
    """The line trick on scenes (prompts used in turn): line IoU, share of frames with a line drawn, angle and
    length errors, task MSE, and in the same figures the baselines of drawing nothing (IoU 0 wherever there
    is a line) and of the mean line. Returns (metrics, {"scene", "target", "prediction"} frames)."""
    device, cfg = next(brain.parameters()).device, brain.cfg
    frames = game.render(settings_list, cfg.img_size, device)
    targets = game.line_target(settings_list, cfg.img_size, device)
    text = tokenizer.encode([prompts[i % len(prompts)] for i in range(len(settings_list))], cfg.seq_len).to(device)
    preds = torch.cat([brain(text[i: i + chunk], frames[i: i + chunk])[1].float()
                       for i in range(0, len(frames), chunk)])
    s = line_scores(preds, targets)
    m = s["measurable"]
    nothing = line_scores(frames, targets)["iou"]
    metrics = {"line_iou": s["iou"].mean().item(), "line_found": s["found"].float().mean().item(),
               "angle_err_deg": s["angle_err"][m].mean().item() if m.any() else float("nan"),
               "length_err": s["length_err"][m].mean().item() if m.any() else float("nan"),
               "task_mse": F.mse_loss(preds, targets).item(),
               "iou_nothing": nothing.mean().item(), "iou_mean_line": mean_line_iou(targets)}
    return metrics, {"scene": frames, "target": targets, "prediction": preds}


def text_loss(logits, text):
    """Next-token cross-entropy; padding is ignored."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), text[:, 1:].flatten(), ignore_index=PAD)


@torch.no_grad()
def replay_sentences(brain, n, generator, chunk=256):
    """n sentences the brain's text model writes from <s> (no image, temperature 1): the language it knows.
    Training on them keeps that language (their loss is the text model's own; it falls only by drifting
    back towards the old model), and held-out ones measure how far a stage moved it."""
    device, L = next(brain.parameters()).device, brain.cfg.seq_len
    out = []
    for i in range(0, n, chunk):
        b = min(chunk, n - i)
        start = torch.full((b, L), PAD, dtype=torch.long, device=device)
        start[:, 0] = BOS
        ones = torch.ones(b, dtype=torch.long, device=device)
        out.append(brain.generate(start, ones, brain.null_image(b), L - 1, generator=generator).tokens)
    return torch.cat(out).cpu()


@torch.no_grad()
def forgetting_probe(brain, frames, sentences, chunk=64):
    """What a skill stage must not destroy: plain reconstruction MSE (no text) of held-out frames, and the
    text model's loss (no image) on held-out sentences."""
    mse = sum(F.mse_loss(brain.img_autoencoder(frames[i: i + chunk]).float(), frames[i: i + chunk],
                         reduction="sum").item() for i in range(0, len(frames), chunk)) / frames.numel()
    return {"plain_mse": mse, "text_loss": sentence_loss(brain, sentences, chunk)}


@torch.no_grad()
def sentence_loss(brain, sentences, chunk=64):
    """The text model's next-token loss (no image) per token of sentences (B, seq_len); padding is ignored."""
    sentences = sentences.to(next(brain.parameters()).device)
    tokens = (sentences[:, 1:] != PAD).sum().item()
    return sum(text_loss(brain.sentence_autoencoder(sentences[i: i + chunk]), sentences[i: i + chunk]).item()
               * (sentences[i: i + chunk, 1:] != PAD).sum().item() for i in range(0, len(sentences), chunk)) / tokens


def add_forgetting_args(parser, qa_replay=False):
    """The flags of the losses that keep earlier skills, shared by the skill stages (qa_replay: the stages after
    the line trick, which also replay it and the QA tutorial's questions)."""
    parser.add_argument("--plain-weight", type=in_range(0), default=1.0, help="weight of the plain reconstruction loss")
    parser.add_argument("--plain-batch", type=at_least(1), default=16,
                        help="image-pretraining frames per batch for the plain reconstruction loss")
    parser.add_argument("--object-weight", type=in_range(0), default=20.0,
                        help="weight of agent, eye and gold pixels in the reconstruction losses (see object_weights)")
    parser.add_argument("--text-weight", type=in_range(0), default=0.1, help="weight of the text model's own loss")
    parser.add_argument("--text-batch", type=at_least(1), default=32, help="sentences per batch for it")
    parser.add_argument("--replay-sentences", type=at_least(1), default=None,
                        help="sentences the text model writes at the start, for its own loss (default: as many as "
                             "the run trains on, --steps x --text-batch, within 1,024-16,384; see replay_count)")
    parser.add_argument("--eval-frames", type=at_least(1), default=256,
                        help="held-out image-pretraining frames and text-model sentences that measure forgetting")
    parser.add_argument("--forgetting-limit", type=in_range(0), default=1.5,
                        help="the most the held-out plain reconstruction MSE may grow over the stage (x its value "
                             "before): a checkpoint past it is chosen as the best only when none stays within, and "
                             "then the one that forgot least (0: no limit)")
    if qa_replay:
        parser.add_argument("--qa-weight", type=in_range(0), default=0.5,
                            help="weight of the QA replay loss, when the brain has learned QA (0: none)")
        parser.add_argument("--qa-batch", type=at_least(1), default=2,
                            help="fresh scenes per family per batch for it, each asked a training question of the family")
        parser.add_argument("--line-replay-weight", type=in_range(0), default=1.0,
                            help="weight of the line trick's replay loss, when the brain has learned it (0: none)")
        parser.add_argument("--line-replay-batch", type=at_least(1), default=8,
                            help="fresh scenes per batch for it, each asked for the line in a training prompt")
        # off by default: in the curriculum it brought the line back (final brain 0.038 -> about 0.2) but imitation
        # walked worse after it (README, "Pointers that find the gold again"); in the agent stages alone it added
        # nothing to the line in two more chains and cost the picture (README, "The pointers' term in the agent
        # stages only")
        parser.add_argument("--line-replay-pointer-weight", type=in_range(0), default=0.0,
                            help="weight of the stroke's pointers' cross-entropy in the line replay, against the "
                                 "patches that hold the bar's ends (0: none, the default; 0.2 was measured; see "
                                 "core.line_trick_loss)")


def past_forgetting_limit(metrics, limit):
    """Whether an evaluation's plain reconstruction grew past limit x its value before the stage (metrics'
    plain_mse_ratio, forgetting); never with limit 0 or no ratio measured. Run.save then ranks the checkpoint
    below every one within the limit: the issue's bound (x1.5) made a rule, not only a figure to read."""
    ratio = (metrics or {}).get("plain_mse_ratio")
    return bool(limit) and ratio is not None and ratio > limit


def object_weights(frames, weight):
    """(B, 1, H, W) loss weights: `weight` on the agent's, eye's and gold's pixels, 1 elsewhere. They are a few
    dozen of 9,216 pixels at 96 px, so plain MSE lets an image encoder blur them away (tiny image pretraining
    rebuilt 2% of eyes and 20% of gold); weighted, it learns to see them within a few hundred batches, and
    the skills that ask where the gold is and where the agent looks need exactly that."""
    names = list(PALETTE)
    classes = colour_classes(frames)
    small = sum(classes == names.index(obj) for obj in ("agent", "eye", "gold"))
    return 1 + (weight - 1) * small[:, None].float()


def frozen_name(text):
    """--freeze's argument: a part of the brain, or a module inside one ("img_enc.blocks")."""
    if text.split(".")[0] not in PARTS:
        raise argparse.ArgumentTypeError(f"{text!r}: not a part of the brain nor a module of one "
                                         f"(parts: {', '.join(PARTS)}; a module: e.g. img_enc.blocks)")
    return text


def freeze_modules(brain, names):
    """Stop the gradient of these modules inside parts ("img_enc.blocks", "img_enc.keypoints.heat"): the rest
    of each part trains. A name that matches no parameter is a UsageError that lists the part's modules."""
    for name in names:
        part, module = name.split(".", 1)
        params = [p for n, p in getattr(brain, part).named_parameters() if n == module or n.startswith(module + ".")]
        if not params:
            children = sorted({n.split(".")[0] for n, _ in getattr(brain, part).named_parameters()})
            raise UsageError(f"--freeze {name}: {part} has no module or parameter {module!r} "
                             f"(its modules: {', '.join(children)})")
        for p in params:
            p.requires_grad_(False)


def trains(brain, *parts):
    """Whether any of these parts of the brain is being trained (has a parameter that requires grad)."""
    return any(p.requires_grad for part in parts for p in getattr(brain, part).parameters())


def keeping_counts(brain, args, replay, qa=None, line=None):
    """How many scenes of each kind keeping_loss needs a batch (keeping_scenes' arguments): image-pretraining
    scenes for the plain reconstruction while an image part trains, scenes per family for the QA replay, bare
    scenes for the line replay while img_dec trains; 0 for a loss not computed."""
    if replay is None:
        return {}
    return dict(plain=args.plain_batch if trains(brain, "img_enc", "img_dec") else 0,
                qa=args.qa_batch if qa is not None else 0,
                line=args.line_replay_batch if line is not None and trains(brain, "img_dec") else 0)


def keeping_scenes(rng, plain=0, qa=0, line=0):
    """The scenes of keeping_loss's batch, drawn ahead (Run.prefetch_scenes) or in place: `plain`
    image-pretraining scenes with their zooms and centres, `qa` balanced scenes of every QA family, `line` bare
    scenes. Settings only: the frames are rendered on the device."""
    return dict(plain=game.pretrain_scenes(plain, rng) if plain else None,
                qa=qa_scenes(qa, rng) if qa else None,
                line=game.random_bare_scenes(rng, line))


def keeping_loss(brain, args, replay, scenes, rng, qa=None, line=None):
    """The losses that keep earlier skills while a later stage trains the parts they live in: object-weighted
    plain reconstruction of image-pretraining frames (x --plain-weight), only while an image part trains,
    the text model's own loss on sentences it wrote before the stage (x --text-weight), only while a text
    part trains (a frozen part cannot forget, and the forward pass would be wasted), given the tokenizer as qa,
    the QA tutorial's questions (qa_replay_loss, x --qa-weight), and given it as line, the line trick
    (line_replay_loss, x --line-replay-weight), only while img_dec, the one part it trains, trains. scenes:
    keeping_scenes(**keeping_counts(...)) of this batch; rng draws the sentences, questions and prompts.
    Returns (weighted sum, {"plain", "text", "qa", "line"} losses); a term not computed is 0, and all are 0
    when replay is None."""
    device = next(brain.parameters()).device
    zero = torch.zeros((), device=device)
    if replay is None:                    # nothing to keep (keeping_setup)
        return zero, {"plain": zero, "text": zero, "qa": zero, "line": zero}
    sentences = replay[torch.from_numpy(rng.integers(len(replay), size=args.text_batch))].to(device)
    plain_loss = zero
    if scenes["plain"] is not None:
        plain = game.render_pretrain_scenes(scenes["plain"], brain.cfg.img_size, device)
        recon = brain.img_autoencoder(plain)
        plain_loss = (object_weights(plain, args.object_weight) * (recon.float() - plain) ** 2).mean()
    text_trains = trains(brain, "text_enc", "text_dec")
    said = text_loss(brain.sentence_autoencoder(sentences), sentences) if text_trains else zero
    answered = qa_replay_loss(brain, qa, scenes["qa"], rng) if scenes["qa"] else zero      # keeping_counts decides
    drawn = (line_replay_loss(brain, line, scenes["line"], rng, args.line_replay_pointer_weight)
             if scenes["line"] else zero)
    total = args.plain_weight * plain_loss + args.text_weight * said
    if qa is not None:
        total = total + args.qa_weight * answered
    if line is not None:
        total = total + args.line_replay_weight * drawn
    return total, {"plain": plain_loss, "text": said, "qa": answered, "line": drawn}


# how much the line trick's loss weighs the squared distance (board units) of the first stroke's ends from the
# ends of the target's bar (line_trick_loss); 100 drew worse lines in 400 batches than 10, and painted phantoms
STROKE_END_WEIGHT = 10.0


def line_trick_loss(recon, frames, targets, want, line_weight=LINE_PIXEL_WEIGHT, drawn=None, bar=None,
                    end_weight=STROKE_END_WEIGHT, pointer_weight=0.0):
    """The line trick's loss: squared error of the redrawn frames against `want` (the line targets, or on a
    control row the frame itself), line pixels (where the target differs from the frame) weighing line_weight
    times the rest. They are about 0.3% of a frame, and with plain MSE drawing nothing is nearly free; on a
    control row the same weight makes a phantom line as costly as a missing one. Given what the strokes drew
    (Brain.draw's Drawn) and the bar (`bar`: game.line_task's ends and flags, the flags cleared on the rows that
    want no bar), plus end_weight x the squared distance (board units) of the first stroke's ends from the bar's,
    and the squared distances of its width from the bar's (in bar widths, game.LINE_WIDTH) and of its colour from
    the bar's, each summed over the rows that want a bar, and of its opacity from 1 on those rows and from 0 on
    the others; all divided by the rows. The image loss alone tells a stroke where to go only once it overlaps
    the bar, and strokes left to it alone stayed where they began; and left to it, the stroke came out twice
    the bar's width, or half opaque, or pale: hedges against ends a few pixels off that halve the IoU (README,
    "The stroke's look and a grammar of requests"). Opacity is taught on the rows that want no bar too: taught
    only where one is wanted, the stroke went on showing on the control rows (in one seed of two). With
    pointer_weight > 0, plus that x the cross-entropy of the first stroke's two pointers (drawn.pointers) against
    the patches that hold the bar's ends, summed over the rows that want a bar: the replay's term
    (line_replay_loss). The end loss reaches a pointer only through the patches it already looks at, and a
    pointer sure of the wrong patch gets almost nothing; the cross-entropy's gradient on the right patch's
    logit is 1 - its probability (README, "Pointers that find the gold again")."""
    weight = 1 + (line_weight - 1) * (targets != frames).any(1, keepdim=True).float()
    loss = (weight * (recon.float() - want) ** 2).mean()
    if drawn is None:
        return loss
    if bar is None:
        raise ValueError("line_trick_loss: the strokes' ends need the bar's ends (bar: game.line_task's last two)")
    target, has = bar
    d = ((drawn.ends[has, 0].float() - target[has]) ** 2).sum((1, 2))         # the first stroke's two ends
    blue = torch.tensor(PALETTE["line"], dtype=torch.float, device=target.device) / 255
    look = ((2 * drawn.half_width[has, 0].float() / game.LINE_WIDTH - 1) ** 2
            + ((drawn.colour[has, 0].float() - blue) ** 2).sum(-1))
    shown = (drawn.opacity[:, 0].float() - has.float()) ** 2
    looked = torch.zeros((), device=recon.device)
    if pointer_weight > 0:
        if drawn.pointers is None:
            raise ValueError("line_trick_loss: pointer_weight needs where the pointers looked (Brain.draw's Drawn)")
        g = math.isqrt(drawn.pointers.shape[-1])                                       # patches a side
        cell = (target[has] * g).long().clamp(0, g - 1)                    # (rows, 2 ends, x y): the end's patch
        index = (cell[..., 1] * g + cell[..., 0])[..., None]
        looked = -drawn.pointers[has, 0].float().gather(-1, index).sum()
    return loss + (end_weight * d.sum() + look.sum() + shown.sum() + pointer_weight * looked) / len(want)


def line_replay_loss(brain, tokenizer, scenes, rng, pointer_weight=0.0):
    """The line trick's loss on fresh bare scenes, each asked in a training prompt: replayed by the stages
    after it. Without it the tiny curriculum's QA tutorial, which trains the image parts to rebuild frames
    given a question, left no line at all (IoU 0.041 after the line trick, 0.0195 = drawing nothing after the
    QA tutorial, a line in 0% of scenes). It trains img_dec alone, the part the tiny line trick trains:
    img_enc's and text_enc's features come in without gradient, so the replay follows them as the stage moves them
    and never pulls on what the answers and the reader (the agent's heading) read. Replayed through every
    part, the turn phase after the tiny QA tutorial read the turn at 53%, without any replay at 80% (one run
    each; README, "Strokes"). With strokes, the end loss too (x STROKE_END_WEIGHT): the picture alone did not
    keep the line in img_dec (IoU 0.012 after the QA tutorial; with the ends, 0.219). pointer_weight: the
    pointers' cross-entropy (line_trick_loss), which found the gold again in the agent stages once the QA
    tutorial had moved the image features under the thin stroke (README, "Pointers that find the gold again")."""
    device, cfg = next(brain.parameters()).device, brain.cfg
    frames, targets, *bar = game.line_task(scenes, cfg.img_size, device)
    prompts = LINE_PROMPTS["train"]
    text = tokenizer.encode([prompts[i] for i in rng.integers(len(prompts), size=len(scenes))], cfg.seq_len).to(device)
    recon, drawn = brain.draw(text, frames, encoders_learn=False)
    return line_trick_loss(recon, frames, targets, targets, drawn=drawn, bar=bar, pointer_weight=pointer_weight)


def qa_replay_loss(brain, tokenizer, scenes, rng):
    """Answer loss (mean over the answer tokens and </s>) of a training question of every QA family (any of its
    phrasings) about fresh scenes balanced for that family (scenes: qa_scenes(n, ...)), each answered in its label's first training
    phrasing, as most of the QA tutorial's answers are: replayed by the stages after it. Without it the
    brain that learned to walk answered no question (0% in the tiny curriculum of the third session); with
    the first question phrasing only, it kept the teacher-forced answers but its answers to held-back
    phrasings fell from 52.6% to 31.7% (README, "The full tiny run")."""
    device = next(brain.parameters()).device
    pairs = [(s, family) for family, some in scenes.items() for s in some]
    asked = [QA_FAMILIES[f]["questions"]["train"] for _, f in pairs]
    text, _, amask = trim_padding(*tokenizer.encode_qa(
        [q[rng.integers(len(q))] for q in asked],
        [QA_FAMILIES[f]["answers"][qa_label(f, s)]["train"][0] for s, f in pairs], brain.cfg.seq_len), device=device)
    ctx = brain.image_context(game.render([s for s, _ in pairs], brain.cfg.img_size, device))
    return answer_token_loss(brain, brain.text_enc(text), ctx, text, amask).mean()


def trim_padding(text, *masks, device=None):
    """text and its masks cut to the longest row's tokens (no compute spent on columns of padding), on device."""
    used = int((text != PAD).sum(1).max())
    return tuple(t[:, :used].to(device) for t in (text, *masks))


def answer_token_loss(brain, text_tokens, ctx, text, amask):
    """Cross-entropy of each answer token and </s> of "<s> question <sep> answer </s>" rows (in the order of
    amask[:, 1:]'s True entries), the vocabulary head run only where it predicts them (position t predicts
    token t + 1). text_tokens: text_enc(text); ctx: the rows' image contexts."""
    logits = brain.decode(text_tokens, ctx, F.pad(amask[:, 1:], (0, 1)))
    return F.cross_entropy(logits.float(), text[:, 1:][amask[:, 1:]], reduction="none")


def keeping_setup(run, brain, args):
    """(replay sentences, forgetting probe, qa, line) for keeping_loss and forgetting: qa is the tokenizer when
    the brain has learned QA and --qa-weight > 0 (its questions are replayed), else None; line likewise for
    the line trick (replayed_line). (None, None, None, None) for a brain whose --init-from gave it no text
    model (no tokenizer): it has no earlier skills to keep."""
    if run.tokenizer is None:
        run.log("no tokenizer from --init-from: no earlier skills to keep, so no plain reconstruction or text replay")
        return None, None, None, None
    qa = run.tokenizer if "qa" in run.skills and getattr(args, "qa_weight", 0) > 0 else None
    if qa is not None:
        run.log(f"the brain has learned QA: its questions are replayed (--qa-weight {args.qa_weight})")
    replay, probe = forgetting_baseline(run, brain, args)
    return replay, probe, qa, replayed_line(run, brain, args)


def replayed_line(run, brain, args):
    """The tokenizer when the brain has learned the line trick and --line-replay-weight > 0, else None:
    keeping_loss then replays the trick while img_dec trains, and kept_skills measures it."""
    if "line" not in run.skills or getattr(args, "line_replay_weight", 0) <= 0 or run.tokenizer is None:
        return None
    if trains(brain, "img_dec"):
        run.log(f"the brain has learned the line trick: it is replayed (--line-replay-weight {args.line_replay_weight})")
    else:
        run.log("the brain has learned the line trick: img_dec, the part the replay trains, is frozen, so it is "
                "measured but not replayed")
    return run.tokenizer


def replay_count(args, text_trains=True):
    """How many sentences forgetting_baseline has the text model write to train on: --replay-sentences, or by
    default one per sentence the run's text loss will draw (--steps x --text-batch), within 1,024-16,384;
    1,024 when no text part trains (text_trains False: keeping_loss skips the text loss, and the bank serves
    only as the line trick's control sentences, so a larger one would be written for nothing).
    A bank the run draws many times over is learned by heart: with 1,024 sentences, 1,500 batches of
    imitation drew each 47 times, the text loss on them fell to 2-3 nats while on held-out sentences it rose
    from 5.8 to 9.8 (worse than a unigram model's 6.2); with 16,384 it stayed at 5.7-5.9 (README, "Twenty-first
    session: language kept through imitation")."""
    if args.replay_sentences is not None:
        return args.replay_sentences
    return min(16384, max(1024, args.steps * args.text_batch)) if text_trains else 1024


def forgetting_baseline(run, brain, args):
    """Before a skill stage, from the --init-from brain: replay_count(...) sentences its text model writes
    (to train on), and the forgetting probe on --eval-frames of the image pretraining's held-out frames and
    of the text pretraining's held-out sentences of the "val" split (or, for a checkpoint that carries none,
    more sentences the text model writes). Made once, on a fresh run, and kept in the checkpoint's cursor, so a resumed run
    trains on and compares with the same. Returns (training sentences, probe = {frames, sentences, before})."""
    n_replay, n_heldout = replay_count(args, trains(brain, "text_enc", "text_dec")), args.eval_frames
    frames = game.pretrain_image_batch(n_heldout, brain.cfg.img_size, heldout_rng(0, split="val"), run.device)
    if "replay" not in run.cursor:
        g = torch.Generator(device=run.device)
        g.manual_seed(run.args.seed)                  # the same sentences on every rank
        heldout = heldout_sentences(run.heldout_text, "val")[:n_heldout]
        bank = replay_sentences(brain, n_replay + n_heldout - len(heldout), g)
        sentences = torch.cat([run.tokenizer.encode(heldout, brain.cfg.seq_len), bank[n_replay:]])
        run.cursor.update(replay=bank[:n_replay], probe_sentences=sentences,
                          before=forgetting_probe(brain, frames, sentences))
        run.log(f"before this stage ({len(heldout)} held-out sentences of text pretraining, val split): "
                + " | ".join(f"{k} {v:.4g}" for k, v in run.cursor["before"].items()))
    c = run.cursor
    return c["replay"].to(run.device), dict(frames=frames, sentences=c["probe_sentences"], before=c["before"])


def forgetting(brain, probe):
    """The probe now, its value before the stage, and now / before (1 = nothing forgotten)."""
    out = forgetting_probe(brain, probe["frames"], probe["sentences"])
    for k, v in list(out.items()):
        out[f"{k}_before"], out[f"{k}_ratio"] = probe["before"][k], v / probe["before"][k]
    return out


@torch.no_grad()
def kept_skills(brain, probe, qa=None, line=None, qa_scenes_per_family=32, line_scenes=64):
    """The later stages' forgetting figures: forgetting(brain, probe) (nothing without a probe), given the
    tokenizer as qa (keeping_setup), the QA accuracy teacher-forced on held-out scenes, per family and mean,
    and given it as line, the line trick's IoU on held-out scenes with held-back prompts (line_iou_kept) and
    with the training prompts, which the replay asks."""
    out = forgetting(brain, probe) if probe is not None else {}
    if line is not None:
        rng = heldout_rng(0, salt=3, split="val")      # the line trick's own held-out scenes
        scenes = game.random_bare_scenes(rng, line_scenes)
        for name, key in (("heldout", "line_iou_kept"), ("train", "line_iou_kept_train_prompts")):
            out[key] = line_metrics(brain, line, scenes, LINE_PROMPTS[name])[0]["line_iou"]
    if qa is not None:
        forced = qa_forced_accuracy(brain, qa, qa_scenes(qa_scenes_per_family, heldout_rng(0, salt=4, split="val")))
        out.update({f"qa_forced_{family}": v for family, v in forced.items()})
        out["qa_forced_mean"] = sum(forced.values()) / len(forced)
    return out


# Question families. Each asks one fact of game.scene_facts in the frame the brain sees (x right, y down),
# with phrasings of the question and of each answer for training, and others held back. No phrasing
# belongs to two families, and the held-back questions are not among the text pretraining's game
# sentences. They are new sentences made of the training phrasings' words ("Is the gold far from you or
# near you?"): they test that the brain reads the question rather than matching a string, which a small
# text model can learn in minutes; synonyms it never saw next to the scene would test its pretraining more
# than this stage. Twelve training questions a family (six before the tenth session): the last six put each
# family's words into frames every family uses ("Tell me whether ...", "From where ..., ...", "On the screen,
# ...", "... of X, where is ...?"), so that the frame does not tell the family and the brain must read whom
# and what is asked about. With six, the tiny brain answered held-back questions as another family's ("Compared
# to the gold, are you above or below?" with where the gold is, "Is the gold straight in front of the agent?"
# with "Left."). No training question uses a held-back question's frame ("Compared to ..., ...", "straight in
# front of", "looking straight at"; "A you or B you" in the left/right families only, _LEFT_RIGHT_FRAMES).
# The four place families also get the questions of a small grammar (place_questions, below). `keywords` is how the answer parser reads a label out of
# generated text.
_LEFT_RIGHT = {"left": ("left",), "right": ("right",)}
_ABOVE_BELOW = {"above": ("above", "up", "over", "higher"), "below": ("below", "down", "under", "lower", "beneath")}

QA_FAMILIES = {
    "gold_left_right": dict(
        label=lambda f: "left" if f["dx"] < 0 else "right",
        keywords=_LEFT_RIGHT,
        questions=dict(train=["Is the gold to the left or to the right of you?",
                              "Is the gold left or right of the agent?",
                              "Is the gold on your left or on your right?",
                              "On which side of the agent is the gold, left or right?",
                              "Where is the gold, left or right of the agent?",
                              "Left or right: where is the gold compared to you?",
                              "Which side is the gold on, left or right?",
                              "From where you stand, is the gold left or right?",
                              "Tell me whether the gold is left or right of the agent.",
                              "Does the gold lie to the left or to the right of you?",
                              "Left or right of the agent, where is the gold?",
                              "On the screen, is the gold more to the left or right than you?"],
                       heldout=["Is the gold on the left or on the right of the agent?",
                                "Compared to you, is the gold left or right?"]),
        answers={"left": dict(train=["Left.", "It's on the left.", "The gold is on the left."],
                              heldout=["The gold lies to the left."]),
                 "right": dict(train=["Right.", "It's on the right.", "The gold is on the right."],
                               heldout=["The gold lies to the right."])}),
    "gold_above_below": dict(
        label=lambda f: "above" if f["dy"] < 0 else "below",
        keywords=_ABOVE_BELOW,
        questions=dict(train=["Is the gold above or below you?",
                              "Is the gold above or below the agent?",
                              "Is the gold higher or lower than the agent on the screen?",
                              "Is the gold up or down from you?",
                              "Where is the gold, above the agent or below it?",
                              "Above or below: where is the gold compared to you?",
                              "Is the gold higher up or lower down than you?",
                              "From where you stand, is the gold up or down?",
                              "Tell me whether the gold is above or below the agent.",
                              "Does the gold lie above or below you?",
                              "Above or below the agent, where is the gold?",
                              "On the screen, is the gold higher or lower than you?"],
                       heldout=["Is the gold above you or below you?",
                                "Compared to you, is the gold above or below?"]),
        answers={"above": dict(train=["Above.", "It's above.", "The gold is above."], heldout=["The gold lies up."]),
                 "below": dict(train=["Below.", "It's below.", "The gold is below."],
                               heldout=["The gold lies down."])}),
    "agent_left_right": dict(
        label=lambda f: "right" if f["dx"] < 0 else "left",
        keywords=_LEFT_RIGHT,
        questions=dict(train=["Are you to the left or to the right of the gold?",
                              "Is the agent left or right of the gold?",
                              "Are you on the left or on the right of the gold?",
                              "On which side of the gold is the agent, left or right?",
                              "Where are you, left or right of the gold?",
                              "Left or right: where are you compared to the gold?",
                              "Which side of the gold are you on, left or right?",
                              "From where the gold is, are you left or right?",
                              "Tell me whether the agent is left or right of the gold.",
                              "Do you stand to the left or to the right of the gold?",
                              "Left or right of the gold, where are you?",
                              "On the screen, are you more to the left or right than the gold?"],
                       heldout=["Is the agent on the left or on the right of the gold?",
                                "Compared to the gold, are you left or right?"]),
        answers={"left": dict(train=["I am on the left.", "I'm to the left of it.", "The agent is on the left."],
                              heldout=["You stand to the left."]),
                 "right": dict(train=["I am on the right.", "I'm to the right of it.", "The agent is on the right."],
                               heldout=["You stand to the right."])}),
    "agent_above_below": dict(
        label=lambda f: "below" if f["dy"] < 0 else "above",
        keywords=_ABOVE_BELOW,
        questions=dict(train=["Are you above or below the gold?",
                              "Is the agent above or below the gold?",
                              "Is the agent higher or lower than the gold on the screen?",
                              "Are you up or down from the gold?",
                              "Where are you, above the gold or below it?",
                              "Above or below: where are you compared to the gold?",
                              "Are you higher up or lower down than the gold?",
                              "From where the gold is, are you up or down?",
                              "Tell me whether the agent is above or below the gold.",
                              "Do you stand above or below the gold?",
                              "Above or below the gold, where are you?",
                              "On the screen, are you higher or lower than the gold?"],
                       heldout=["Is the agent above the gold or below the gold?",
                                "Compared to the gold, are you above or below?"]),
        answers={"above": dict(train=["I am above.", "I'm above it.", "The agent is above."],
                               heldout=["You stand higher up."]),
                 "below": dict(train=["I am below.", "I'm below it.", "The agent is below."],
                               heldout=["You stand lower down."])}),
    "turn": dict(
        label=lambda f: "left" if f["turn"] == game.LEFT else "right",
        keywords=_LEFT_RIGHT,
        questions=dict(train=["Which way should you turn to face the gold, left or right?",
                              "Should you turn left or right to face the gold?",
                              "To look at the gold, do you turn left or right?",
                              "Which turn faces the gold sooner, left or right?",
                              "Turn left or right: which brings the gold in front of you?",
                              "Left or right, which way do you turn towards the gold?",
                              "Which way do you turn to face the gold, left or right?",
                              "Tell me whether to turn left or right to face the gold.",
                              "Do you need to turn left or right to face the gold?",
                              "Left or right: which turn points you at the gold?",
                              "Which way must the agent turn to face the gold?",
                              "To see the gold ahead, should you turn left or right?"],
                       heldout=["Should the agent turn left or right to face the gold?",
                                "To face the gold, which way do you turn, left or right?"]),
        answers={"left": dict(train=["Turn left.", "Go left.", "I should turn left."], heldout=["Rotate left."]),
                 "right": dict(train=["Turn right.", "Go right.", "I should turn right."],
                               heldout=["Rotate right."])}),
    "ahead": dict(
        label=lambda f: "yes" if f["gold_ahead"] else "no",
        keywords={"yes": ("yes", "yep", "yeah"), "no": ("no", "nope", "not")},
        questions=dict(train=["Is the gold straight ahead of you?",
                              "Is the gold in front of the agent?",
                              "Are you facing the gold?",
                              "If you walk forward, will you reach the gold?",
                              "Is the gold right in front of you?",
                              "Does the agent face the gold?",
                              "Is the gold directly ahead of you?",
                              "Tell me whether the gold is straight ahead.",
                              "Would walking forward take you to the gold?",
                              "Is the agent pointed at the gold?",
                              "Will going forward bring you to the gold?",
                              "Is the gold ahead of the agent?"],
                       heldout=["Is the gold straight in front of the agent?",
                                "Are you looking straight at the gold?"]),
        answers={"yes": dict(train=["Yes.", "Yes, it is ahead.", "Yes, I am facing it."],
                             heldout=["Yep, dead ahead."]),
                 "no": dict(train=["No.", "No, it is not ahead.", "No, I am not facing it."],
                            heldout=["Nope, I would miss it."])}),
    "near": dict(
        label=lambda f: "near" if f["near"] else "far",
        keywords={"near": ("near", "close", "nearby"), "far": ("far", "distant")},
        questions=dict(train=["Is the gold near or far?",
                              "Is the gold close to you or far away?",
                              "Is the agent near the gold or far from it?",
                              "How far is the gold: near or far?",
                              "Is the gold nearby or distant?",
                              "Near or far: where is the gold?",
                              "Tell me whether the gold is near or far.",
                              "Is the gold close by or a long way off?",
                              "From where you stand, is the gold near or far?",
                              "Near or far from the agent, where is the gold?",
                              "Is the distance to the gold short or long?",
                              "On the screen, is the gold close to the agent or far from it?"],
                       heldout=["Is the gold far from you or near you?",
                                "Is the gold near the agent or far away?"]),
        answers={"near": dict(train=["Near.", "It's near.", "The gold is close."], heldout=["Quite close by."]),
                 "far": dict(train=["Far.", "It's far.", "The gold is far away."], heldout=["Rather distant."])}),
}


# Place questions from a small grammar, added to the four place families' twelve hand-written ones (the
# nineteenth session): frames x who is asked about (the gold; "you" or "the agent") x whom it is compared to
# x three pairs of place words. With the twelve alone, the 144 px brains answered one held-back phrasing of a
# family wrong while its other one right ("Is the agent above the gold or below the gold?" near chance where
# "Compared to the gold, are you above or below?" was right): they had learned which words go with which
# family's strings, not to read the subject, the reference and the place words apart. The grammar varies
# these three independently. None of its frames is a held-back question's ("Compared to"; "A R or B R" is
# held back by the vertical families and near, and only the left/right families get it, below); a
# question it makes that some family already asks, held back or not, is dropped, and so is one that reads
# more like a held-back question than any hand-written training question does (README, "Place questions
# from a grammar": on average a gain at the QA tutorial's end over three seeds, not a cure).
_PLACE_FRAMES = ["{Be} {s} {a} or {b}{p} {r}?",
                 "Where {be} {s}, {a} or {b}{p} {r}?",
                 "{A} or {b}{p} {r}: where {be} {s}?",
                 "Tell me whether {s} {be} {a} or {b}{p} {r}.",
                 "On the board, {be} {s} {a} or {b}{p} {r}?",
                 "Would you say {s} {be} {a} or {b}{p} {r}?",
                 "Please say if {s} {be} {a} or {b}{p} {r}.",
                 "Can you tell if {s} {be} {a} or {b}{p} {r}?"]
# The "A R or B R" frame ("Is the gold to the left of you or to the right of you?"), in the left/right families
# only: the above/below families hold it back ("Is the gold above you or below you?", "Is the agent above the
# gold or below the gold?"), so those test the frame learnt on the other axis, as their "Compared to ..."
# phrasings test a frame learnt in other families. Without it no training question named the reference twice,
# and the 144 px brains of some seeds answered the vertical ones in the other family's words (the twenty-ninth
# session; README, "The 'A R or B R' frame on the left/right axis").
_LEFT_RIGHT_FRAMES = ["{Be} {s} {a}{p} {r} or {b}{p} {r}?"]
_PLACE_WORDS = {"left_right": [("left", "right", " of"), ("to the left", "to the right", " of"),
                               ("on the left", "on the right", " of")],
                "above_below": [("above", "below", ""), ("higher", "lower", " than"), ("up", "down", " from")]}


def place_questions(family):
    """The grammar's questions for one of the four place families ('gold_left_right', ...), in a fixed order."""
    who, axis = family.split("_", 1)
    pairs = [("the gold", r) for r in ("you", "the agent")] if who == "gold" else [(s, "the gold") for s in ("you", "the agent")]
    out = []
    for frame in _PLACE_FRAMES + (_LEFT_RIGHT_FRAMES if axis == "left_right" else []):
        for s, r in pairs:
            be = "are" if s == "you" else "is"
            for a, b, p in _PLACE_WORDS[axis]:
                q = frame.format(Be=be.capitalize(), be=be, s=s, r=r, A=a.capitalize(), a=a, b=b, p=p)
                if q not in out:
                    out.append(q)
    return out


def _add_place_questions(families):
    """Each place family's training questions += the grammar's, less those some family asks already and those
    that read more like a held-back question than any hand-written training question does (none is a copy
    of a held-back question with a word changed)."""
    asked = [q for fam in families.values() for said in fam["questions"].values() for q in said]
    heldout = [q for fam in families.values() for q in fam["questions"]["heldout"]]
    hand = [q for fam in families.values() for q in fam["questions"]["train"]]
    nearest = {h: max(closeness(h, q) for q in hand) for h in heldout}
    for family in ("gold_left_right", "gold_above_below", "agent_left_right", "agent_above_below"):
        families[family]["questions"]["train"] += [
            q for q in place_questions(family) if q not in asked and all(closeness(h, q) <= nearest[h] for h in heldout)]


_add_place_questions(QA_FAMILIES)


def _as_said(text):
    """Text with case and spacing aside, to compare answers word for word."""
    return " ".join(text.lower().split())


_ANSWER_FAMILY = {_as_said(a): family for family, fam in QA_FAMILIES.items()     # no phrasing is in two families
                  for said in fam["answers"].values() for a in said["train"] + said["heldout"]}


def qa_label(family, settings):
    """The true answer (a label of the family) about a scene's first gold piece."""
    return QA_FAMILIES[family]["label"](game.scene_facts(settings))


NEGATIONS = {"no", "not", "nope", "never", "isn", "aren", "don", "doesn"}


def parse_answer(family, text):
    """Generated text -> the label its words name, or None when they name no label or more than one, or
    when a negation the family has no label for turns the meaning around ("not near")."""
    words = set("".join(c if c.isalpha() else " " for c in text.lower()).split())
    keywords = QA_FAMILIES[family]["keywords"]
    if words & (NEGATIONS - {k for keys in keywords.values() for k in keys}):
        return None
    named = [label for label, keys in keywords.items() if words & set(keys)]
    return named[0] if len(named) == 1 else None


def qa_scenes(n, rng, families=None, max_tries=10000):
    """{family: n bare scenes}, the labels taking turns so each family is balanced (chance = 1/labels): rare
    facts ("the gold is ahead": about 7% of random scenes) would otherwise make 'always no' look clever.
    Scenes are drawn until one has the wanted label, so each label keeps the game's own distribution."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    out = {}
    for family in families or QA_FAMILIES:
        labels = list(QA_FAMILIES[family]["answers"])
        first = int(rng.integers(len(labels)))        # which label gets the extra scene when n is odd
        scenes = []
        for i in range(n):
            want = labels[(first + i) % len(labels)]
            for _ in range(max_tries):
                s = game.random_bare_settings(rng)
                if qa_label(family, s) == want:
                    scenes.append(s)
                    break
            else:
                raise ValueError(f"qa_scenes: no scene with {family} = {want} in {max_tries} tries")
        out[family] = scenes
    return out


def qa_chance(scenes):
    """{family: accuracy of always giving the family's commonest label on these scenes}."""
    out = {}
    for family, settings in scenes.items():
        labels = [qa_label(family, s) for s in settings]
        out[family] = max(labels.count(x) for x in set(labels)) / len(labels)
    return out


def qa_prompts(tokenizer, questions, seq_len):
    """<s> question <sep> as generation prompts: (tokens (B, seq_len), lengths)."""
    toks, qmask, _ = tokenizer.encode_qa(questions, [""] * len(questions), seq_len)
    return toks.masked_fill(~qmask, PAD), qmask.sum(1)


@torch.no_grad()
def qa_answers(brain, tokenizer, scenes, phrasings="heldout", chunk=128):
    """The brain's greedy answer to every question phrasing of each family about each of its scenes:
    {family: [{question, answer, label, parsed, correct}]}. Every scene is asked every phrasing: cycling
    phrasings over scenes whose labels alternate would tie each phrasing to one label, and a brain that
    answered by the phrasing alone would look perfect."""
    device, cfg = next(brain.parameters()).device, brain.cfg
    out = {}
    for family, settings in scenes.items():
        pairs = [(q, s) for s in settings for q in QA_FAMILIES[family]["questions"][phrasings]]
        records = []
        for i in range(0, len(pairs), chunk):
            questions, part = zip(*pairs[i: i + chunk])
            text, lengths = qa_prompts(tokenizer, questions, cfg.seq_len)
            text, lengths = text.to(device), lengths.to(device)
            ctx = brain.image_context(game.render(list(part), cfg.img_size, device))
            done, _ = brain.greedy(text, lengths, ctx, cfg.seq_len - int(lengths.min()))
            for j, s in enumerate(part):
                answer = tokenizer.decode(done[j, int(lengths[j]):])
                label, parsed = qa_label(family, s), parse_answer(family, answer)
                records.append(dict(question=questions[j], answer=answer, label=label, parsed=parsed,
                                    correct=parsed == label))
        out[family] = records
    return out


@torch.no_grad()
def qa_forced_accuracy(brain, tokenizer, scenes, chunk=128):
    """{family: share of scenes where, after the family's first training question, the true label's first
    training answer is likelier than every other label's} (answers scored teacher-forced, not generated).
    It shows the brain reading the frame before its generated answers to other phrasings parse."""
    device, cfg = next(brain.parameters()).device, brain.cfg
    out = {}
    for family, settings in scenes.items():
        fam = QA_FAMILIES[family]
        labels, right = list(fam["answers"]), 0
        for i in range(0, len(settings), chunk):
            part = settings[i: i + chunk]
            ctx = brain.image_context(game.render(part, cfg.img_size, device))
            scores = []
            for label in labels:
                text, _, amask = tokenizer.encode_qa([fam["questions"]["train"][0]] * len(part),
                                                     [fam["answers"][label]["train"][0]] * len(part), cfg.seq_len)
                logp, _ = brain.compute_probabilities(text.to(device), ctx)
                scores.append((logp * amask[:, 1:].to(device)).sum(1))
            best = torch.stack(scores, 1).argmax(1).tolist()
            right += sum(labels[b] == qa_label(family, s) for b, s in zip(best, part))
        out[family] = right / len(settings)
    return out


def accuracy_by_family(answers):
    return {family: sum(r["correct"] for r in records) / len(records) for family, records in answers.items()}


def accuracy_by_phrasing(answers):
    """{family: {question: share of its scenes answered right}}: one held-back phrasing can fail alone."""
    out = {}
    for family, records in answers.items():
        asked = {}
        for r in records:
            asked.setdefault(r["question"], []).append(r["correct"])
        out[family] = {question: sum(right) / len(right) for question, right in asked.items()}
    return out


def answered_as(text):
    """The family one of whose answer phrasings the text is, word for word (case and spacing aside), or None."""
    return _ANSWER_FAMILY.get(_as_said(text))


def other_family_share(answers):
    """{family: share of its answers that are another family's answer phrasing}: the brain took the question
    for another family's ("Is the agent above the gold or below the gold?" answered "Above.", the gold's
    words, so about the gold's place, which is the opposite label)."""
    return {family: sum(answered_as(r["answer"]) not in (None, family) for r in records) / len(records)
            for family, records in answers.items()}


def qa_accuracy(brain, tokenizer, scenes, phrasings="heldout"):
    """{family: share of scenes where the generated answer parses to the true label}; unrecognised = wrong."""
    return accuracy_by_family(qa_answers(brain, tokenizer, scenes, phrasings))
