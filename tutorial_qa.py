"""tutorial_qa.py: stage 4 of the curriculum, answering questions about a scene.

Seven families of questions (core.QA_FAMILIES): is the gold left or right of the agent on screen, above or
below it; is the agent left or right of the gold, above or below it; which turn faces the gold sooner; is
the gold ahead; is it near or far. Labels come from game.scene_facts in the frame the brain sees. Each
batch asks every family about each of its fresh bare scenes (balanced on the rarest fact: the gold is
ahead in 7% of random scenes), with training phrasings of questions and answers; held-back question
phrasings are used only for evaluation. The four place families have twelve hand-written training
questions and 38-44 more from a grammar (core.place_questions: frames x whom x compared to whom x place
words; the left/right families also "Is the gold to the left of you or to the right of you?", a frame the
above/below families hold back), the others twelve (README, "Place questions from a grammar"). The
phrasings come in two phases, both measured (README, "The QA tutorial"):
- for the first --first-phrasings batches, each family is asked in one phrasing and answered in one per
  label. The brain begins to read the frame much sooner so (two families: 60% / 94% after 250 batches
  against 72% / 59% with all phrasings from the start).
- then any training question, and any training answer for a share --answer-variety of them (the label's
  first answer otherwise). All answers at once undid the reading learned in the first phase (left/right
  of the gold back at chance 100 batches later): the label comes at another position in each answer
  ("Left." / "It's on the left."), and each is a new thing to learn; varying the questions did no harm.
text_enc trains too, at --lr-text-enc (its language kept by the replay loss): frozen, it let the brain
answer held-back questions in another family's words (held-back accuracy 50% against 67% after 200
batches of the second phase, from the same brain; answers in the first phrasing in both).
Each scene is asked as many questions as there are families, the families drawn by family_shares: half
evenly, half in proportion to each family's running answer loss (--focus), so that the families not
yet learned (turn and ahead, last) get more of the questions (about a fifth each; in the runs measured
that did not yet make them learnable within 600 batches: README, "QA figures"). --family-every brings the families in one by one instead of all at once (the
way needed before TextDecoder's summary of the keypoint token; see FAMILY_ORDER).
--families asks some families only; the others are replayed (core.qa_replay_loss, x --qa-weight) and still
evaluated. The curriculum's turn phase is this stage again after the seven families: turn alone, 32 scenes
a batch in one phrasing, at a constant rate, every part frozen but the brain's keypoint reader
(core.KeypointReader), which learns to read the heading for the text decoder (README, "The turn phase and
the keypoint reader").

The text is "<s> question <sep> answer </s>" through qa_forward: the text side sees question and answer
causally, the image is rebuilt from the question only. The loss is on the answer tokens only: the
question is given at test time, so predicting it teaches nothing about the scene; whole-sequence loss (the
original's) is dominated by the question's many image-blind tokens (its "loss 0.3" said little about the
answers) and spends the gradient on them. Language is kept by the text model's own loss instead
(sentences it wrote before this stage, x --text-weight), and the image side by the question-conditioned
reconstruction of the frame plus img_autoencoder on image-pretraining frames (x --plain-weight), and a brain
that learned the line trick keeps drawing it (core.line_replay_loss, x --line-replay-weight, into img_dec
alone; line_iou_kept at each evaluation, with held-back and training prompts).

Measured, not assumed: each evaluation generates a greedy answer after "<s> question <sep>" for held-out
scenes (balanced labels, so chance is 50%) and held-back question phrasings, parses it to a label
(unrecognised = wrong), and reports accuracy per family beside chance, with the training phrasings'
accuracy for comparison and examples in the log. Forgetting as in trick_line: plain reconstruction MSE and
text loss before the first step and after. The best checkpoint has the highest mean held-out accuracy
among those whose plain reconstruction stayed within --forgetting-limit (x1.5 of before; core.Run.save).

    python tutorial_qa.py --init-from runs/image/pretrain_image_best.pt runs/text/pretrain_text_best.pt
"""
import functools
import itertools

import numpy as np
import torch

import core
import game

NEEDS = ["img_enc", "img_dec", "text_enc", "text_dec"]


def check_lengths(tokenizer, seq_len):
    """Every question with every answer of its family fits seq_len (encode_qa says which does not)."""
    for fam in core.QA_FAMILIES.values():
        answers = [a for label in fam["answers"].values() for a in label["train"] + label["heldout"]]
        pairs = list(itertools.product(fam["questions"]["train"] + fam["questions"]["heldout"], answers))
        tokenizer.encode_qa(*zip(*pairs), seq_len)


# The order in which the families join training with --family-every: where the gold is first, then how far,
# then the mirrored questions about the agent, then those that need the agent's heading. Before the text
# decoder added the keypoint token to every text position (core.TextDecoder), seven families asked at once
# stayed at chance for 400 batches in benchmarks/probe_reading.py while one or two alone were learned in
# 200-300; with it, all seven at once are the default (the four positional families >= 86% after 200 probe
# batches). Turn and ahead, which need the agent's heading, are the slowest either way.
FAMILY_ORDER = ["gold_left_right", "gold_above_below", "near", "agent_left_right", "agent_above_below", "turn", "ahead"]
assert sorted(FAMILY_ORDER) == sorted(core.QA_FAMILIES)


def asked_families(batch, every, families=FAMILY_ORDER):
    """The families trained at this batch, of `families` in FAMILY_ORDER: two at first, one more every `every`
    batches (0: all at once)."""
    order = [f for f in FAMILY_ORDER if f in families]
    return order if every <= 0 else order[: 2 + batch // every]


def qa_batch(pairs, rng, first=False, answer_variety=1.0):
    """A question and its answer for each (scene, family) pair, with training phrasings drawn at random:
    (questions, answers) in the pairs' order. first: each family's first question and each label's first
    answer only. Otherwise any training question, and any training answer for a share answer_variety of
    them (the label's first answer for the rest)."""
    questions, answers = [], []
    for s, family in pairs:
        fam = core.QA_FAMILIES[family]
        phrasings = fam["questions"]["train"]
        questions.append(phrasings[0] if first else phrasings[rng.integers(len(phrasings))])
        said = fam["answers"][core.qa_label(family, s)]["train"]
        answers.append(said[0] if first or rng.random() >= answer_variety else said[rng.integers(len(said))])
    return questions, answers


def family_shares(families, losses, focus):
    """How often each family is asked: an even share, plus a share `focus` in proportion to the family's
    running answer loss (families not yet measured count as the worst). Asked alike, the seven families
    are not learned alike: the left/right and above/below ones come first, while turn and ahead stayed at
    chance for 1,200 batches, and were learned (92%) once asked alone (README, "QA figures")."""
    known = [losses[f] for f in families if f in losses]
    loss = np.array([losses.get(f, max(known, default=1.0)) for f in families])
    return (1 - focus) / len(families) + focus * loss / max(loss.sum(), 1e-9)


def family_losses(token_loss, amask, names):
    """{family: mean answer loss per question} of one batch, from the loss of each answer token (in the
    order of amask[:, 1:]'s True entries) and the questions' families (names, row by row)."""
    rows = amask[:, 1:].nonzero()[:, 0]
    per_row = torch.zeros(len(amask), device=token_loss.device).index_add_(0, rows, token_loss.detach())
    per_row = (per_row / amask[:, 1:].sum(1).clamp(min=1)).tolist()
    out = {}
    for name, value in zip(names, per_row):
        out.setdefault(name, []).append(value)
    return {name: sum(v) / len(v) for name, v in out.items()}


@torch.no_grad()
def evaluate(brain, tokenizer, scenes, probe, log):
    """Accuracy per family (held-back and training phrasings) beside chance, forgetting, examples in the log."""
    answers = core.qa_answers(brain, tokenizer, scenes, "heldout")
    accuracy = core.accuracy_by_family(answers)
    some = {family: settings[:20] for family, settings in scenes.items()}      # training phrasings: 6 per scene
    trained = core.accuracy_by_family(core.qa_answers(brain, tokenizer, some, "train"))
    chance = core.qa_chance(scenes)
    metrics = {}
    for family in scenes:
        metrics[f"acc_{family}"], metrics[f"chance_{family}"] = accuracy[family], chance[family]
        for r in answers[family][:1] + answers[family][-1:]:
            log(f"example {family}: {r['question']} -> {r['answer']!r} (parsed {r['parsed']}, truth {r['label']})")
    metrics["acc_mean"] = sum(accuracy.values()) / len(accuracy)
    metrics["acc_min"] = min(accuracy.values())
    metrics["acc_train_phrasings_mean"] = sum(trained.values()) / len(trained)
    forced = core.qa_forced_accuracy(brain, tokenizer, scenes)
    metrics.update({f"forced_acc_{family}": v for family, v in forced.items()})
    metrics["forced_acc_mean"] = sum(forced.values()) / len(forced)
    metrics.update(core.forgetting(brain, probe))
    return metrics


def main(argv=None):
    parser = core.stage_parser(__doc__, steps=1500, batch_size=32, lr=1e-3, warmup=100, eval_every=250,
                               save_every=250)
    parser.add_argument("--family-every", type=core.at_least(0), default=0,
                        help="train two families first and add one every this many batches (0: all from the start)")
    parser.add_argument("--first-phrasings", type=core.at_least(0), default=400,
                        help="for this many batches, one question and one answer per label of each family; then all")
    parser.add_argument("--answer-variety", type=core.in_range(0, 1), default=0.25,
                        help="after --first-phrasings, the share of answers in any training phrasing (the rest: "
                             "each label's first)")
    parser.add_argument("--focus", type=core.in_range(0, 1), default=0.5,
                        help="share of the questions given to the families in proportion to their running answer "
                             "loss (the rest: evenly; 0: every scene asked every family once)")
    parser.add_argument("--families", nargs="+", default=FAMILY_ORDER, choices=FAMILY_ORDER, metavar="FAMILY",
                        help="the families asked (default all seven); with fewer, the others are replayed "
                             f"(--qa-weight) and still evaluated. One of: {', '.join(FAMILY_ORDER)}")
    core.add_forgetting_args(parser, qa_replay=True)
    core.add_workers_arg(parser)
    parser.add_argument("--eval-scenes", type=core.at_least(1), default=100,
                        help="held-out scenes per family in each evaluation")
    # text_enc learns the questions at a third of the rate: at the full rate the held-out text loss rose
    # x2.6 in 1,200 batches; at 1e-4 held-back questions were learned much later (README, "QA figures")
    parser.set_defaults(lr_text_enc=3e-4)
    args = parser.parse_args(argv)

    run = core.Run("tutorial_qa", args, trains=NEEDS + ["reader"], mode="max")
    brain = run.build(run.tokenizer)      # the brain's vocabulary follows the pretrained tokenizer
    core.check_init_parts(run.origins, run.tokenizer, NEEDS, "tutorial_qa")
    tokenizer, size, L = run.tokenizer, run.cfg.img_size, run.cfg.seq_len
    check_lengths(tokenizer, L)
    replay, probe = core.forgetting_baseline(run, brain, args)
    scenes = core.qa_scenes(args.eval_scenes, core.heldout_rng(0, salt=4, split="val"))
    # asked a few families, the brain keeps the others by answering them about a few scenes a batch
    qa = tokenizer if args.qa_weight > 0 and set(args.families) != set(FAMILY_ORDER) else None
    line = core.replayed_line(run, brain, args)   # the line trick, learned before, drawn on a few scenes a batch
    # scenes balanced on the rarest fact asked (the gold is ahead in 7% of random scenes)
    balance = "ahead" if "ahead" in args.families else args.families[0]
    data = run.prefetch_scenes(functools.partial(core.qa_scenes, args.batch_size, families=[balance]),
                               core.keeping_counts(brain, args, replay, qa, line))

    for batch in run.batches():
        rng = run.rng()
        with run.timing("data"):
            batch_scenes, kept_scenes = data.get(batch)
            batch_scenes = batch_scenes[balance]
            families = asked_families(batch, args.family_every, args.families)
            asked = len(families)               # questions per scene: its families drawn by family_shares
            shares = family_shares(families, run.cursor.setdefault("family_loss", {}), args.focus)
            names = [families[i] for _ in batch_scenes
                     for i in (rng.choice(asked, asked, p=shares) if args.focus > 0 else range(asked))]
            pairs = zip([s for s in batch_scenes for _ in range(asked)], names)
            questions, answers = qa_batch(pairs, rng, batch < args.first_phrasings, args.answer_variety)
            frames = game.render(batch_scenes, size, run.device)
            text, qmask, amask = core.trim_padding(*tokenizer.encode_qa(questions, answers, L), device=run.device)
        with run.autocast():
            # qa_forward taken apart, so that each frame is encoded once for all its questions
            img_tokens, text_tokens = brain.image_context(frames), brain.text_enc(text)
            token_loss = core.answer_token_loss(brain, text_tokens, img_tokens.repeat_interleave(asked, 0), text, amask)
            asked_loss = torch.zeros((), device=run.device)
            if core.trains(brain, "img_enc", "img_dec"):                          # the frame rebuilt from one question
                heard = (qmask & (text != core.PAD))[::asked]
                recon = brain.img_dec(img_tokens, text_tokens[::asked], heard)
                asked_loss = (core.object_weights(frames, args.object_weight) * (recon.float() - frames) ** 2).mean()
            keep, kept = core.keeping_loss(brain, args, replay, kept_scenes, rng, qa, line)
        answer_loss = token_loss.mean()
        running = run.cursor["family_loss"]
        for family, value in family_losses(token_loss, amask, names).items():
            running[family] = value if family not in running else 0.9 * running[family] + 0.1 * value
        loss = answer_loss + args.plain_weight * asked_loss + keep
        run.step(loss)
        run.log_step({"loss": loss.item(), "answer": answer_loss.item(), "asked": asked_loss.item(),
                      **{name: value.item() for name, value in kept.items()}}, samples=len(questions))
        if run.due(args.eval_every) or run.final():
            metrics = evaluate(brain, tokenizer, scenes, probe, run.log)
            metrics.update({f"asked_{f}": float(p) for f, p in zip(families, shares)})
            metrics.update(core.kept_skills(brain, None, line=line))
            run.save(metrics, metric=metrics["acc_mean"])
        elif run.due(args.save_every):
            run.save()
    run.close()


if __name__ == "__main__":
    core.main_guard(main)
