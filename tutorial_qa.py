"""tutorial_qa.py: stage 4 of the curriculum, answering questions about a scene.

Seven families of questions (core.QA_FAMILIES): is the gold left or right of the agent on screen, above or
below it; is the agent left or right of the gold, above or below it; which turn faces the gold sooner; is
the gold ahead; is it near or far. Labels come from game.scene_facts in the frame the brain sees. Each
batch holds every family, its labels balanced, on fresh bare scenes, with training phrasings of questions
and answers; held-back question phrasings are used only for evaluation.

The text is "<s> question <sep> answer </s>" through qa_forward: the text side sees question and answer
causally, the image is rebuilt from the question only. The loss is on the answer tokens only: the
question is given at test time, so predicting it teaches nothing about the scene; whole-sequence loss (the
original's) is dominated by the question's many image-blind tokens (its "loss 0.3" said little about the
answers) and spends the gradient on them. Language is kept by the text model's own loss instead
(sentences it wrote before this stage, x --text-weight), and the image side by the question-conditioned
reconstruction of the frame plus img_autoencoder on image-pretraining frames (x --plain-weight).

Measured, not assumed: each evaluation generates a greedy answer after "<s> question <sep>" for held-out
scenes (balanced labels, so chance is 50%) and held-back question phrasings, parses it to a label
(unrecognised = wrong), and reports accuracy per family beside chance, with the training phrasings'
accuracy for comparison and examples in the log. Forgetting as in trick_line: plain reconstruction MSE and
text loss before the first step and after. The best checkpoint has the highest mean held-out accuracy.

    python tutorial_qa.py --init-from runs/image/pretrain_image_best.pt runs/text/pretrain_text_best.pt
"""
import itertools

import torch
import torch.nn.functional as F

import core
import game

NEEDS = ["img_enc", "img_dec", "text_enc", "text_dec"]


def pick(pool, n, rng):
    return pool[torch.from_numpy(rng.integers(len(pool), size=n)).to(pool.device)]


def check_lengths(tokenizer, seq_len):
    """Every question with every answer of its family fits seq_len (encode_qa says which does not)."""
    for fam in core.QA_FAMILIES.values():
        answers = [a for label in fam["answers"].values() for a in label["train"] + label["heldout"]]
        pairs = list(itertools.product(fam["questions"]["train"] + fam["questions"]["heldout"], answers))
        tokenizer.encode_qa(*zip(*pairs), seq_len)


def qa_batch(scenes, rng):
    """(scenes, questions, answers) of a batch: training phrasings drawn at random."""
    flat, questions, answers = [], [], []
    for family, settings in scenes.items():
        fam = core.QA_FAMILIES[family]
        for s in settings:
            flat.append(s)
            questions.append(fam["questions"]["train"][rng.integers(len(fam["questions"]["train"]))])
            said = fam["answers"][core.qa_label(family, s)]["train"]
            answers.append(said[rng.integers(len(said))])
    return flat, questions, answers


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
    metrics.update(core.forgetting(brain, probe))
    return metrics


def main(argv=None):
    parser = core.stage_parser(__doc__, steps=1500, batch_size=56, lr=3e-4, warmup=100, eval_every=250,
                               save_every=250)
    parser.add_argument("--plain-weight", type=float, default=1.0,
                        help="weight of the image losses (frame rebuilt from the question; plain autoencoding)")
    core.add_forgetting_args(parser)
    parser.add_argument("--eval-scenes", type=int, default=100, help="held-out scenes per family in each evaluation")
    args = parser.parse_args(argv)

    run = core.Run("tutorial_qa", args, trains=NEEDS, mode="max")
    brain = run.build(run.tokenizer)      # the brain's vocabulary follows the pretrained tokenizer
    core.check_init_parts(run.origins, run.tokenizer, NEEDS, "tutorial_qa")
    tokenizer, size, L = run.tokenizer, run.cfg.img_size, run.cfg.seq_len
    check_lengths(tokenizer, L)
    replay, probe = core.forgetting_baseline(run, brain, args.replay_sentences, args.eval_frames)
    scenes = core.qa_scenes(args.eval_scenes, core.heldout_rng(0, salt=4))
    per_family = max(1, args.batch_size // len(core.QA_FAMILIES))

    for batch in run.batches():
        rng = run.rng()
        with run.timing("data"):
            flat, questions, answers = qa_batch(core.qa_scenes(per_family, rng), rng)
            frames = game.render(flat, size, run.device)
            text, qmask, amask = tokenizer.encode_qa(questions, answers, L)
            used = int((text != core.PAD).sum(1).max())         # no compute spent on columns of padding
            text, qmask, amask = (t[:, :used].to(run.device) for t in (text, qmask, amask))
            plain = game.pretrain_image_batch(args.plain_batch, size, rng, run.device)
            sentences = pick(replay, args.text_batch, rng)
        with run.autocast():
            logits, recon = brain.qa_forward(text, frames, qmask)
            plain_recon = brain.img_autoencoder(plain)
            replay_logits = brain.sentence_autoencoder(sentences)
        target = amask[:, 1:]               # logits at t predict token t+1: the answer's tokens and </s>
        answer_loss = F.cross_entropy(logits[:, :-1][target].float(), text[:, 1:][target])
        plain_loss = (F.mse_loss(recon.float(), frames) + F.mse_loss(plain_recon.float(), plain)) / 2
        text_loss = core.text_loss(replay_logits, sentences)
        loss = answer_loss + args.plain_weight * plain_loss + args.text_weight * text_loss
        run.step(loss)
        run.log_step({"loss": loss.item(), "answer": answer_loss.item(), "plain": plain_loss.item(),
                      "text": text_loss.item()}, samples=len(flat))
        if run.due(args.eval_every) or run.final():
            metrics = evaluate(brain, tokenizer, scenes, probe, run.log)
            run.save(metrics, metric=metrics["acc_mean"])
        elif run.due(args.save_every):
            run.save()
    run.close()


if __name__ == "__main__":
    core.main_guard(main)
