"""eval.py: what a brain has learned, measured skill by skill on held-out data, in one report.

    python eval.py runs/curriculum/grpo/best
    python eval.py runs/curriculum/qa/best runs/curriculum/grpo/best --out reports/rl    # before / after
    python eval.py runs/curriculum/grpo/best --split val    # the scenes the stages chose their best by

A checkpoint is a file, a run folder (its newest valid checkpoint) or FOLDER/best. For every skill the
checkpoint was trained for (checkpoints list them, their ancestors' included; any other skill is reported
as "not trained", not measured), on held-out seeds fixed in core.py: the "test" split of core.heldout_rng,
which no stage script sees (they evaluate, and choose their best checkpoints, on the "val" split; likewise
the text pretraining's held-out sentences, core.heldout_sentences, since the thirty-first session); `--split val`
measures on the stages' split instead, to set a report beside their logs:

  image  reconstruction MSE of image-pretraining frames, beside the MSE of the mean frame; the share of
         frames whose agent, eye, gold and walls come back in their colours
  text   next-token loss and perplexity on the test (or val) half of the text pretraining's held-out
         sentences (they travel in the checkpoint), beside a unigram model fit on those very sentences;
         sampled sentences
  line   line IoU with the held-back prompts, beside drawing nothing and drawing the mean line, and with the
         training prompts (a later stage can keep the trick for the prompts it replays only); angle and
         length errors; lines drawn when nobody asked (plain reconstruction)
  qa     accuracy per question family with the held-back phrasings, beside chance; per phrasing; the share
         of answers given in another family's words (the question taken for another family's)
  agent  success within 31 actions and actions to the gold at several offsets, greedy and sampled, beside
         the oracle (forward only, and allowed to reverse) and a random policy played on the same scenes in
         the same run

Writes DIR/report.md (one table, a column per checkpoint, so two checkpoints show what a stage taught and
what it made the brain forget), DIR/report.json (the same figures unrounded, with each checkpoint's path,
stage and batch and the split, for scripts that compare runs) and PNGs: reconstructions, lines, QA
answers, agent trajectories, and loss curves from the metrics.jsonl of the checkpoint's run and of the runs
it started from (--init-from). --qa-scenes, --agent-scenes and --line-scenes enlarge the held-out sets (100
QA scenes a family give about +-3-5 points a family).
"""
import argparse
import glob
import json
import math
import os
import textwrap
from collections import Counter

import numpy as np
import torch

import core
import game

SKILLS = ("image", "text", "line", "qa", "agent")
# held-out set sizes: the stage scripts' defaults (same sizes; --split chooses the scenes), and a smoke-test size
SIZES = {"full": dict(frames=256, sentences=None, line_scenes=256, qa_scenes=100, agent_scenes=100,
                      offsets=(0.1, 0.2, 0.3, 0.5)),
         "quick": dict(frames=32, sentences=256, line_scenes=32, qa_scenes=10, agent_scenes=16, offsets=(0.1, 0.3))}
# what the loss-curve figure shows of each stage: a training key and the held-out keys its best is chosen by
CURVES = {"pretrain_image": ("loss", ("mse",)), "pretrain_text": ("loss", ("heldout_loss",)),
          "trick_line": ("loss", ("line_iou", "iou_mean_line")), "tutorial_qa": ("answer", ("acc_mean",)),
          "rl_fake_traces": ("loss", ("greedy_success@",)), "rl_grpo": ("success", ("greedy_success@",))}
PICTURE_PX = 192     # scenes in the QA and trajectory pictures are drawn this large, to be read by a person


class Checkpoint:
    """A checkpoint's brain (on the CPU until measured), tokenizer, skills and metadata; the optimizer state
    and the rest of what resuming needs are dropped (a base checkpoint's optimizer is twice its weights)."""

    def __init__(self, spec, device):
        self.brain, self.ckpt, self.path = core.load_brain(spec)
        self.tokenizer = core.Tokenizer.from_json(self.ckpt["tokenizer"]) if self.ckpt.get("tokenizer") else None
        stage = self.ckpt.get("stage")
        self.skills = set(self.ckpt.get("skills") or [core.STAGE_SKILLS.get(stage)])
        self.label = f"{stage} @{self.ckpt.get('batch')}"
        self.device = device


# ---------------------------------------------------------------------------------------------
# skills: each returns [(figure, value, format)] and writes its pictures under `prefix`


def image_figures(c, sizes, prefix):
    frames = game.pretrain_image_batch(sizes["frames"], c.brain.cfg.img_size, core.heldout_rng(0, split=sizes["split"]),
                                       c.device)
    recon = torch.cat([c.brain.img_autoencoder(f).float() for f in frames.split(64)])
    core.save_image_grid([frames[:8], recon[:8]], prefix + "reconstructions.png")
    rows = [("held-out MSE", torch.nn.functional.mse_loss(recon, frames).item(), "num"),
            ("baseline: MSE of the mean frame", frames.var(0, unbiased=False).mean().item(), "num")]
    rows += [(f"{obj} recovered (share of frames)", v, "pct") for obj, v in core.object_recovery(recon, frames).items()]
    return rows, None


def unigram_loss(ids):
    """Loss per token of the best unigram model of these very tokens (their entropy): a floor for any model
    that ignores context."""
    counts = np.array(list(Counter(ids[:, 1:][ids[:, 1:] != core.PAD].tolist()).values()), dtype=float)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def text_figures(c, sizes, prefix):
    sentences = core.heldout_sentences(c.ckpt.get("heldout_text"), sizes["split"])[: sizes["sentences"]]
    if not sentences:
        return [("held-out loss (nats/token)", "no held-out sentences in the checkpoint", "str")], None
    ids = c.tokenizer.encode(sentences, c.brain.cfg.seq_len)
    loss = core.sentence_loss(c.brain, ids)
    g = torch.Generator(device=c.device).manual_seed(0)
    samples = [c.tokenizer.decode(t) for t in core.replay_sentences(c.brain, 4, g)]
    return [(f"held-out loss (nats/token, {len(sentences)} {sizes['split']} sentences)", loss, "num"),
            ("held-out perplexity", math.exp(loss), "num"),
            ("baseline: unigram loss on the same sentences", unigram_loss(ids), "num")], samples


def line_figures(c, sizes, prefix):
    rng = core.heldout_rng(0, salt=3, split=sizes["split"])     # trick_line.py's held-out scenes
    scenes = game.random_bare_scenes(rng, sizes["line_scenes"])
    m, pictures = core.line_metrics(c.brain, c.tokenizer, scenes, core.LINE_PROMPTS["heldout"])
    trained = core.line_metrics(c.brain, c.tokenizer, scenes, core.LINE_PROMPTS["train"])[0]
    core.save_image_grid([pictures[k][:8] for k in ("scene", "target", "prediction")], prefix + "lines.png")
    plain = torch.cat([c.brain.img_autoencoder(f) for f in pictures["scene"].split(64)])
    phantom = (core.line_mask(plain).flatten(1).sum(1) >= 3).float().mean().item()
    return [("line IoU, held-back prompts", m["line_iou"], "num"),
            ("baseline: IoU of drawing nothing", m["iou_nothing"], "num"),
            ("baseline: IoU of the mean line", m["iou_mean_line"], "num"),
            ("line IoU, training prompts", trained["line_iou"], "num"),
            ("line drawn (share of scenes)", m["line_found"], "pct"),
            ("angle error (degrees)", m["angle_err_deg"], "num"),
            ("length error (board units)", m["length_err"], "num"),
            ("phantom lines in plain reconstruction", phantom, "pct")], None


def qa_figures(c, sizes, prefix):
    scenes = core.qa_scenes(sizes["qa_scenes"], core.heldout_rng(0, salt=4, split=sizes["split"]))  # tutorial_qa.py's
    answers = core.qa_answers(c.brain, c.tokenizer, scenes, "heldout")
    accuracy, chance = core.accuracy_by_family(answers), core.qa_chance(scenes)
    draw_qa(scenes, answers, prefix + "qa.png")
    rows = [(f"mean accuracy, held-back phrasings ({sizes['qa_scenes']} scenes per family)",
             sum(accuracy.values()) / len(accuracy), "pct"),
            ("baseline: chance (commonest label), mean", sum(chance.values()) / len(chance), "pct"),
            ("lowest family accuracy", min(accuracy.values()), "pct")]
    forced = core.qa_forced_accuracy(c.brain, c.tokenizer, scenes)
    phrasing, other = core.accuracy_by_phrasing(answers), core.other_family_share(answers)
    return rows + [(f"accuracy: {family}", accuracy[family], "pct") for family in scenes] + \
        [(f"accuracy: {family}, \"{question}\"", acc, "pct") for family in scenes
         for question, acc in phrasing[family].items()] + \
        [(f"answered in another family's words: {family}", other[family], "pct") for family in scenes] + \
        [(f"label's answer likelier, first phrasings: {family}", forced[family], "pct") for family in scenes], None


def agent_figures(c, sizes, prefix):
    size, device = c.brain.cfg.img_size, c.device
    m = core.evaluate_agent(c.brain, size, device, sizes["offsets"], sizes["agent_scenes"], split=sizes["split"])
    draw_trajectories(c.brain, size, device, max(sizes["offsets"]), prefix + "trajectories.png", sizes["split"])
    rows = []
    for offset in sizes["offsets"]:
        rows += [(f"success @{offset}: greedy", m[f"greedy_success@{offset}"], "pct"),
                 (f"success @{offset}: sampled", m[f"sample_success@{offset}"], "pct"),
                 (f"success @{offset}: baseline oracle", m[f"oracle_success@{offset}"], "pct"),
                 (f"success @{offset}: baseline oracle, backward allowed", m[f"oracle_backward_success@{offset}"], "pct"),
                 (f"success @{offset}: baseline random", m[f"random_success@{offset}"], "pct"),
                 (f"actions to gold @{offset}: greedy", m[f"greedy_actions@{offset}"], "num"),
                 (f"actions to gold @{offset}: oracle", m[f"oracle_actions@{offset}"], "num"),
                 (f"actions to gold @{offset}: oracle, backward allowed", m[f"oracle_backward_actions@{offset}"], "num")]
    return rows, None


MEASURES = {"image": image_figures, "text": text_figures, "line": line_figures, "qa": qa_figures,
            "agent": agent_figures}


def forgetting_figures(c):
    """What the checkpoint's own stage measured against the brain it started from (trick_line, tutorial_qa)."""
    m = c.ckpt.get("metrics") or {}
    return [("plain reconstruction MSE, after / before its stage", m.get("plain_mse_ratio", float("nan")), "ratio"),
            ("text model's loss, after / before its stage", m.get("text_loss_ratio", float("nan")), "ratio")]


# ---------------------------------------------------------------------------------------------
# pictures


def _font(px):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=px)
    except TypeError:                 # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _to_pil(frame):
    from PIL import Image
    return Image.fromarray((frame.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))


def draw_qa(scenes, answers, path, per_family=2):
    """Each family's first scenes with the held-back question and the brain's answer, green if right."""
    from PIL import Image, ImageDraw
    font, px, text_h = _font(11), PICTURE_PX, 84
    families = list(scenes)
    sheet = Image.new("RGB", (len(families) * px, per_family * (px + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for col, family in enumerate(families):
        records = answers[family][:per_family]
        frames = game.render(scenes[family][: len(records)], px)
        for row, (frame, r) in enumerate(zip(frames, records)):
            x, y = col * px, row * (px + text_h)
            sheet.paste(_to_pil(frame), (x, y))
            lines = textwrap.wrap("Q: " + r["question"], 30)[:3] + textwrap.wrap("A: " + (r["answer"] or "(nothing)"), 30)[:2]
            lines.append(f"truth: {r['label']}")
            colour = (0, 130, 0) if r["correct"] else (200, 0, 0)
            for i, line in enumerate(lines):
                draw.text((x + 4, y + px + 2 + 13 * i), line, fill=colour if i >= len(lines) - 3 else "black", font=font)
    sheet.save(path)


def draw_trajectories(brain, size, device, offset, path, split="test", n=8):
    """The brain's greedy path (magenta) and the oracle's (blue) from held-out start scenes."""
    from PIL import Image, ImageDraw
    scenes = core.agent_scenes(offset, n, salt=int(offset * 100), split=split)   # the first the agent row plays
    paths = {policy: core.rollout(scenes, policy, size, device, brain=brain) for policy in ("greedy", "oracle")}
    px, font = PICTURE_PX, _font(12)
    sheet = Image.new("RGB", (n * px, px + 18), "white")
    draw = ImageDraw.Draw(sheet)
    for b, frame in enumerate(game.render(scenes, px)):
        sheet.paste(_to_pil(frame), (b * px, 0))
        for policy, colour in (("oracle", (0, 90, 255)), ("greedy", (220, 0, 220))):
            r = paths[policy]
            points = [(b * px + s[b].agent_x * px, s[b].agent_y * px) for s in r.states[: int(r.steps[b]) + 1]]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
        r = paths["greedy"]
        said = f"reached in {int(r.steps[b])}" if r.success[b] else f"missed ({int(r.steps[b])} actions)"
        draw.text((b * px + 4, px + 3), f"brain: {said}", fill=(0, 130, 0) if r.success[b] else (200, 0, 0), font=font)
    sheet.save(path)


def lineage(path, folders=None, visited=None):
    """Run folders of this checkpoint and of the checkpoints it started from (--init-from), earliest first;
    those no longer on this machine are left out. Checkpoints are memory-mapped: only their arguments are read."""
    folders, visited = ([], set()) if folders is None else (folders, visited)
    if path in visited:
        return folders
    visited.add(path)
    try:
        args = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("args") or {}
    except Exception:                  # gone, or not a checkpoint: no curves from it
        return folders
    for parent in args.get("init_from") or []:
        try:
            lineage(os.path.abspath(core.resolve_checkpoint(parent)), folders, visited)
        except core.CheckpointError:
            pass
    folder = os.path.dirname(path)
    if folder not in folders:
        folders.append(folder)
    return folders


def read_metrics(folder):
    records = []
    path = os.path.join(folder, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:       # a line cut by a kill
                    pass
    return records


def draw_curves(path, out):
    """Training and held-out curves of each run in the checkpoint's lineage, one row per run; False if none."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = []
    for folder in lineage(os.path.abspath(path)):
        records = read_metrics(folder)
        stage = next((core.parse_checkpoint_name(p)[0] for p in sorted(os.listdir(folder))
                      if core.parse_checkpoint_name(p)), os.path.basename(folder))
        if records:
            runs.append((stage, folder, records))
    if not runs:
        return False
    fig, axes = plt.subplots(len(runs), 2, figsize=(10, 2.6 * len(runs)), squeeze=False)
    for (stage, folder, records), (left, right) in zip(runs, axes):
        train_key, eval_keys = CURVES.get(stage, ("loss", ()))
        train = [r for r in records if r.get("kind") == "train" and train_key in r]
        values = [r[train_key] for r in train]
        left.plot([r["batch"] for r in train], values, lw=1, marker="o" if len(train) < 20 else None, ms=3)
        if train_key != "success" and values and min(values) > 0 and max(values) > 3 * min(values):
            left.set_yscale("log")
        left.set_title(f"{stage}: training {train_key}", fontsize=9)
        evals = [r for r in records if r.get("kind") == "eval"]
        keys = sorted({k for r in evals for k in r if any(k.startswith(e) for e in eval_keys)})
        for k in keys:
            pts = [(r["batch"], r[k]) for r in evals if k in r and r[k] is not None]
            right.plot(*zip(*pts), marker="o", ms=3, lw=1, label=k)
        right.set_title(f"{stage}: held-out", fontsize=9)
        if keys:
            right.legend(fontsize=7)
        for ax in (left, right):
            ax.set_xlabel("batch", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------
# the report


def fmt(value, kind):
    if kind == "str":
        return value
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return {"pct": f"{value:.1%}", "ratio": f"{value:.2f}×", "num": f"{value:.4g}"}[kind]


def as_number(value):
    """A figure for report.json: a float, or None where it is not a number (NaN, a message)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def evaluate(c, sizes, prefix, log=print):
    """{skill: [(figure, cell text)] or None (not trained)}, text samples, {skill: {figure: number or None}} (the
    unrounded values, for report.json); pictures written."""
    results, samples, values = {}, None, {}
    c.brain.to(c.device)
    for skill in SKILLS:
        if skill not in c.skills:
            results[skill] = values[skill] = None
            continue
        log(f"{c.label}: measuring {skill}", flush=True)
        with torch.no_grad():
            torch.manual_seed(0)
            rows, extra = MEASURES[skill](c, sizes, prefix)
        results[skill] = [(name, fmt(v, kind)) for name, v, kind in rows]
        values[skill] = {name: v if kind == "str" else as_number(v) for name, v, kind in rows}
        samples = extra if skill == "text" else samples
    c.brain.cpu()                      # one brain on the device at a time
    forgetting = forgetting_figures(c)
    results["forgetting"] = [(name, fmt(v, kind)) for name, v, kind in forgetting]
    values["forgetting"] = {name: as_number(v) for name, v, _ in forgetting}
    return results, samples, values


def table(labels, columns):
    """One Markdown table: a row per (skill, figure), a column per checkpoint; "not trained" where it was not."""
    order = []
    for results in columns:
        for skill, rows in results.items():
            for name, _ in rows or []:
                if (skill, name) not in order:
                    order.append((skill, name))
    for skill in (*SKILLS, "forgetting"):            # a skill no checkpoint was trained for still gets its row
        if not any(s == skill for s, _ in order):
            order.append((skill, "—"))
    order.sort(key=lambda key: (*SKILLS, "forgetting").index(key[0]))
    lines = ["| skill | figure | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for skill, name in order:
        cells = []
        for results in columns:
            if results.get(skill) is None:
                cells.append("not trained")
            else:
                cells.append(dict(results[skill]).get(name, "—"))
        lines.append(f"| {skill} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_file(path, text):
    """Write text to path whole or not at all (a report half written by a killed run never replaces the last)."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                        help="checkpoint files, run folders (newest valid checkpoint) or FOLDER/best; one column each")
    parser.add_argument("--out", default="eval_report", help="folder for report.md and the pictures")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N; default: cuda if present, else cpu")
    parser.add_argument("--gpu", type=core.at_least(0), default=None,
                        help="CUDA device index (shorthand for --device cuda:N)")
    parser.add_argument("--quick", action="store_true", help="small held-out sets: a smoke test, not a measurement")
    parser.add_argument("--split", choices=list(core.HELDOUT_SPLITS), default="test",
                        help="held-out split: test (default; no stage sees it) or val (the one the stages evaluate on "
                             "and choose their best by, to compare with their logs)")
    for key, what in (("line_scenes", "line trick scenes"), ("qa_scenes", "QA scenes per family"),
                      ("agent_scenes", "agent scenes per offset")):
        parser.add_argument("--" + key.replace("_", "-"), type=core.at_least(1), default=None,
                            help=f"held-out {what} (default: {SIZES['full'][key]}, or {SIZES['quick'][key]} "
                                 "with --quick); more for tighter figures")
    args = parser.parse_args(argv)
    device = core.pick_device(args)
    sizes = dict(SIZES["quick" if args.quick else "full"], split=args.split)
    sizes.update({key: getattr(args, key) for key in ("line_scenes", "qa_scenes", "agent_scenes")
                  if getattr(args, key)})
    checkpoints = [Checkpoint(spec, device) for spec in args.checkpoints]       # all load before any is measured
    os.makedirs(args.out, exist_ok=True)

    labels, columns, sections, figures = [], [], [], []
    for i, c in enumerate(checkpoints, 1):
        label = f"{i}: {c.label}" if len(checkpoints) > 1 else c.label
        prefix = os.path.join(args.out, f"{i}_{c.ckpt.get('stage')}_")
        for old in glob.glob(glob.escape(prefix) + "*.png"):      # pictures of an earlier report in this folder
            os.remove(old)
        results, samples, values = evaluate(c, sizes, prefix)
        figures.append(dict(label=label, checkpoint=c.path, stage=c.ckpt.get("stage"), batch=c.ckpt.get("batch"),
                            skills=[s for s in SKILLS if s in c.skills], figures=values, samples=samples))
        labels.append(label)
        columns.append(results)
        section = [f"### {label}", "", f"`{c.path}`", "",
                   "Skills trained: " + (", ".join(s for s in SKILLS if s in c.skills) or "none"), ""]
        if samples:
            section += ["Sentences it writes (from `<s>`, no image, temperature 1):", ""]
            section += [f"- {s}" for s in samples] + [""]
        pictures = [("reconstructions", "held-out frames (top) and their reconstructions (bottom)"),
                    ("lines", "scene, true line, the brain's line (held-back prompts)"),
                    ("qa", "held-back questions and the brain's answers (green: right, red: wrong)"),
                    ("trajectories", "the brain's greedy path (magenta) and the oracle's (blue)")]
        if draw_curves(c.path, prefix + "curves.png"):
            pictures.append(("curves", "training and held-out curves of this run and the runs it started from"))
        for name, caption in pictures:
            if os.path.exists(prefix + name + ".png"):
                section += [f"{caption}:", "", f"![{name}]({os.path.basename(prefix)}{name}.png)", ""]
        sections.append("\n".join(section))

    report = "\n".join([
        "# Evaluation report", "",
        f"Held-out sets: {'quick (smoke test)' if args.quick else 'full'} ({sizes['qa_scenes']} QA scenes per family, "
        f"{sizes['agent_scenes']} agent scenes per offset, {sizes['line_scenes']} line scenes), "
        f"the {args.split} split; device {device}. A skill a checkpoint was not trained for is marked \"not trained\". "
        "Baselines are measured on the same data in the same run.",
        "", table(labels, columns), "", *sections])
    path = os.path.join(args.out, "report.md")
    write_file(path, report + "\n")
    meta = dict(split=args.split, held_out="quick" if args.quick else "full", device=str(device), sizes=sizes)
    write_file(os.path.join(args.out, "report.json"), json.dumps(dict(meta, checkpoints=figures), indent=1))
    print(table(labels, columns))
    print(f"report: {path}")


if __name__ == "__main__":
    core.main_guard(main)
