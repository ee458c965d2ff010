"""Small pretrained checkpoints for the skill stages' tests: a few steps of each pretraining with SMALL_ARGS.

The text corpus holds every phrasing the skill stages use, so the 600-token BPE has words for them and a
question with its answer fits the default 32 tokens."""
import core
from conftest import SMALL_ARGS, run_script

SKILL_ARGS = [*SMALL_ARGS, "--vocab", "600"]


def skill_sentences():
    texts = core.LINE_PROMPTS["train"] + core.LINE_PROMPTS["heldout"]
    for fam in core.QA_FAMILIES.values():
        texts += fam["questions"]["train"] + fam["questions"]["heldout"]
        texts += [a for label in fam["answers"].values() for a in label["train"] + label["heldout"]]
    return texts + [f"The {a} {b} sat by the {c}." for a in ("red", "old", "small") for b in ("cat", "dog", "man")
                    for c in ("door", "tree", "river")]


def pretrain(folder):
    """(image checkpoint, text checkpoint) in folder, after a few steps of each pretraining."""
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(skill_sentences()) + "\n")
    common = [*SKILL_ARGS, "--steps", 4, "--batch-size", 8, "--warmup", 2, "--eval-every", 4]
    run_script("pretrain_image.py", *common, "--run-dir", folder / "image", "--eval-frames", 8)
    run_script("pretrain_text.py", *common, "--run-dir", folder / "text", "--corpus", corpus, "--samples", 1)
    return folder / "image" / "pretrain_image_best.pt", folder / "text" / "pretrain_text_best.pt"
