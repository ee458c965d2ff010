"""The QA tutorial: labels on hand-built scenes, the answer parser, the phrasings' rules, and the stage as a
user runs it (a few steps of a small brain, accuracy per family beside chance, exact resume after SIGKILL)."""
import math
import re
import signal

import numpy as np
import pytest
import torch

import core
import game
import pretrain_text
import tutorial_qa
from conftest import kill_when, run_script
from pretrained import SKILL_ARGS, pretrain, skill_sentences

UP, DOWN, LEFTWARD, RIGHTWARD = 3 * math.pi / 2, math.pi / 2, math.pi, 0.0     # headings on screen (y down)


def labels(agent, gold, heading):
    s = game.Settings(agent[0], agent[1], heading, gold=[gold])
    return {family: core.qa_label(family, s) for family in core.QA_FAMILIES}


def test_labels_gold_straight_left_and_behind_the_agent():
    got = labels((0.5, 0.5), (0.3, 0.5), RIGHTWARD)
    assert got["gold_left_right"] == "left" and got["agent_left_right"] == "right"
    assert got["ahead"] == "no" and got["near"] == "near"
    assert got["turn"] == "right"                   # exactly behind: the game's tie-break
    assert labels((0.5, 0.5), (0.3, 0.5), LEFTWARD)["ahead"] == "yes"


def test_labels_gold_straight_above_in_screen_terms():
    got = labels((0.5, 0.5), (0.5, 0.2), UP)        # y grows downward: smaller y is higher on screen
    assert got["gold_above_below"] == "above" and got["agent_above_below"] == "below"
    assert got["ahead"] == "yes" and got["near"] == "far"
    assert labels((0.5, 0.5), (0.5, 0.8), UP)["gold_above_below"] == "below"


def test_labels_turns_are_named_as_the_frame_shows():
    assert labels((0.5, 0.5), (0.5, 0.2), RIGHTWARD)["turn"] == "left"     # facing right, gold up: turn left
    assert labels((0.5, 0.5), (0.5, 0.8), RIGHTWARD)["turn"] == "right"
    assert labels((0.5, 0.5), (0.8, 0.5), DOWN)["turn"] == "left"
    assert labels((0.5, 0.5), (0.8, 0.52), RIGHTWARD)["ahead"] == "yes"    # within the agent's width
    assert labels((0.5, 0.5), (0.8, 0.6), RIGHTWARD)["ahead"] == "no"


def test_labels_on_the_boundary_keep_gold_and_agent_families_opposite():
    level = labels((0.5, 0.5), (0.8, 0.5), DOWN)     # same row: "above" only when strictly higher
    assert level["gold_above_below"] == "below" and level["agent_above_below"] == "above"
    column = labels((0.5, 0.5), (0.5, 0.8), DOWN)    # same column: "left" only when strictly left
    assert column["gold_left_right"] == "right" and column["agent_left_right"] == "left"
    assert labels((0.5, 0.5), (0.5, 0.5 + game.NEAR_DISTANCE), DOWN)["near"] == "far"
    assert labels((0.5, 0.5), (0.5, 0.5 + game.NEAR_DISTANCE - 1e-3), DOWN)["near"] == "near"


def test_every_phrasing_parses_to_its_label_and_nothing_else_does():
    for family, fam in core.QA_FAMILIES.items():
        for label, said in fam["answers"].items():
            for answer in said["train"] + said["heldout"]:
                assert core.parse_answer(family, answer) == label, (family, answer)
    assert core.parse_answer("gold_left_right", "LEFT!") == "left"
    for garbage in ["", "Left or right.", "Blue.", "The gold is above.", "leftover"]:
        assert core.parse_answer("gold_left_right", garbage) is None
    assert core.parse_answer("ahead", "Left.") is None and core.parse_answer("ahead", "No, not ahead.") == "no"
    assert core.parse_answer("near", "Not near.") is None and core.parse_answer("turn", "Don't turn left.") is None


def test_accuracy_is_split_by_phrasing_and_answers_in_another_familys_words_are_counted():
    ask, tell = core.QA_FAMILIES["agent_above_below"]["questions"]["heldout"], "agent_above_below"
    records = [dict(question=ask[0], answer="Above.", label="below", parsed="above", correct=False),
               dict(question=ask[0], answer="I am above.", label="above", parsed="above", correct=True),
               dict(question=ask[1], answer=" i AM  below. ", label="below", parsed="below", correct=True),
               dict(question=ask[1], answer="Near.", label="above", parsed=None, correct=False),
               dict(question=ask[1], answer="Above, I think.", label="above", parsed="above", correct=True)]
    assert core.accuracy_by_phrasing({tell: records}) == {tell: {ask[0]: 0.5, ask[1]: 2 / 3}}
    assert core.accuracy_by_family({tell: records}) == {tell: 0.6}
    assert [core.answered_as(r["answer"]) for r in records] == [
        "gold_above_below", tell, tell, "near", None]                 # its own words, others', no phrasing
    assert core.other_family_share({tell: records}) == {tell: 0.4}


def test_phrasings_belong_to_one_family_and_held_back_questions_are_new():
    seen = {}
    for family, fam in core.QA_FAMILIES.items():
        texts = fam["questions"]["train"] + fam["questions"]["heldout"]
        texts += [a for said in fam["answers"].values() for a in said["train"] + said["heldout"]]
        for text in texts:
            assert seen.setdefault(text, family) == family, f"{text!r} is in {seen[text]} and {family}"
        assert len(fam["questions"]["train"]) >= 3 and fam["questions"]["heldout"]
        assert not set(fam["questions"]["heldout"]) & set(fam["questions"]["train"])
        assert not set(fam["questions"]["heldout"]) & set(pretrain_text._game_pool())
    assert len(core.QA_FAMILIES) == 7


PLACES = {"gold_left_right": ("the gold", ["you", "the agent"], ("left", "right")),
          "agent_left_right": ("you|the agent", ["the gold"], ("left", "right")),
          "gold_above_below": ("the gold", ["you", "the agent"], ("above|higher|up", "below|lower|down")),
          "agent_above_below": ("you|the agent", ["the gold"], ("above|higher|up", "below|lower|down"))}


@pytest.mark.parametrize("family", sorted(PLACES))
def test_place_questions_from_the_grammar_ask_one_pair_and_stay_apart_from_the_held_back(family):
    """The grammar asks whom, compared to whom, and one pair of place words of the family's axis; it adds
    each question once, none another family asks, and none closer to a held-back question than the
    hand-written ones come. Only the left/right families name the reference twice ("A you or B you"): the
    above/below families hold that frame back."""
    subject, references, (a, b) = PLACES[family]
    made = core.place_questions(family)
    train = core.QA_FAMILIES[family]["questions"]["train"]
    added = train[12:]                                  # after the twelve hand-written questions
    assert len(made) == len(set(made)) >= 40 and 30 <= len(added) <= len(made) and set(added) <= set(made)
    hand = [q for fam in core.QA_FAMILIES.values() for q in fam["questions"]["train"][:12]]
    heldout = [q for fam in core.QA_FAMILIES.values() for q in fam["questions"]["heldout"]]
    twice = []
    for q in made:
        low = q.lower()
        assert len(re.findall(rf"\b({a})\b", low)) == 1 and len(re.findall(rf"\b({b})\b", low)) == 1, q
        assert re.search(rf"\b({subject})\b (is|are)\b|\b(is|are) ({subject})\b", low), q
        tail = low[re.search(rf"\b({a}|{b})\b", low).start():]                 # from the place words on
        named = sum(len(re.findall(rf"\b{r}\b", tail)) for r in references)
        assert named == 1 or (named == 2 and "left" in a), q    # "A you or B you" on the left/right axis only
        twice += [q] * (named == 2 and q in added)
        assert not low.startswith("compared to"), q
    for q in added:
        assert q not in heldout and q not in hand
        assert all(core.closeness(h, q) <= max(core.closeness(h, t) for t in hand) for h in heldout), q
    if family == "gold_left_right":     # one word from the held-back "... on the right of the agent?": dropped
        assert "Is the gold on the left or on the right of you?" in set(made) - set(train)
    assert len(twice) >= (3 if "left" in a else 0)     # the above/below families hold that frame back


def test_phrasing_phases_one_phrasing_then_any_question_and_some_answers():
    """First phase: one question per family, one answer per label. Then every training question, and the
    label's first answer except for a share --answer-variety of the answers; every pair is labelled right."""
    rng = np.random.default_rng(0)
    scenes = core.qa_scenes(600, 1, families=["ahead"])["ahead"]

    def asked(first, variety):
        qs, ans = tutorial_qa.qa_batch([(s, f) for s in scenes for f in tutorial_qa.FAMILY_ORDER], rng, first, variety)
        pairs = list(zip(qs, ans))
        for i, (q, a) in enumerate(pairs):          # scene by scene, families in order
            family, scene = tutorial_qa.FAMILY_ORDER[i % 7], scenes[i // 7]
            assert q in core.QA_FAMILIES[family]["questions"]["train"]
            assert core.parse_answer(family, a) == core.qa_label(family, scene), (q, a)
        return {q for q, _ in pairs}, [a for _, a in pairs]

    firsts = {said["train"][0] for fam in core.QA_FAMILIES.values() for said in fam["answers"].values()}
    questions, answers = asked(True, 1.0)
    assert len(questions) == 7 and set(answers) <= firsts
    questions, answers = asked(False, 0.0)
    assert len(questions) == sum(len(f["questions"]["train"]) for f in core.QA_FAMILIES.values())
    assert set(answers) <= firsts
    _, answers = asked(False, 0.5)
    share = sum(a not in firsts for a in answers) / len(answers)      # 1/2 drawn from 3 phrasings: 1/3 new
    assert 0.2 < share < 0.45


def test_families_with_the_higher_answer_loss_are_asked_more():
    shares = tutorial_qa.family_shares(["near", "turn", "ahead"], {"near": 0.0, "turn": 0.6}, focus=0.5)
    assert shares == pytest.approx([1 / 6, 1 / 6 + 0.25, 1 / 6 + 0.25])   # ahead, not yet measured: the worst
    assert tutorial_qa.family_shares(["near", "turn"], {}, focus=0.5) == pytest.approx([0.5, 0.5])
    assert tutorial_qa.family_shares(["near", "turn"], {"near": 0.1, "turn": 0.9}, focus=0.0) == pytest.approx([0.5, 0.5])


def test_scenes_are_balanced_so_chance_is_one_half():
    scenes = core.qa_scenes(6, 0)
    assert core.qa_chance(scenes) == {family: 0.5 for family in core.QA_FAMILIES}
    assert core.qa_scenes(6, 0)["ahead"][0] == scenes["ahead"][0]          # reproducible by seed


def test_every_scene_is_asked_every_held_back_phrasing():
    """Cycling phrasings over scenes whose labels alternate would tie each phrasing to one label, and a brain
    answering by the phrasing alone would look perfect; so each scene is asked each phrasing."""
    tokenizer = core.Tokenizer.train(skill_sentences(), 600)
    cfg = core.make_config("tiny", img_size=32, patch=8, width=32, img_heads=2, text_heads=2, value_heads=2,
                           vocab=tokenizer.vocab)
    scenes = core.qa_scenes(2, 0, families=["gold_left_right", "ahead"])
    answers = core.qa_answers(core.Brain(cfg).eval(), tokenizer, scenes, "heldout")
    for family, records in answers.items():
        asked = {(r["question"], r["label"]) for r in records}
        labels = core.QA_FAMILIES[family]["answers"]
        assert len(records) == 2 * len(core.QA_FAMILIES[family]["questions"]["heldout"])
        assert asked == {(q, label) for q in core.QA_FAMILIES[family]["questions"]["heldout"] for label in labels}
        assert all(set(r) == {"question", "answer", "label", "parsed", "correct"} for r in records)


def test_later_stages_replay_the_questions_and_can_learn_their_answers():
    tokenizer = core.Tokenizer.train(skill_sentences(), 600)
    torch.manual_seed(0)
    cfg = core.make_config("tiny", img_size=32, patch=8, width=32, img_heads=2, text_heads=2, value_heads=2,
                           vocab=tokenizer.vocab)
    brain = core.Brain(cfg)
    opt = torch.optim.Adam(brain.parameters(), 3e-3)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(40):
        loss = core.qa_replay_loss(brain, tokenizer, core.qa_scenes(2, rng), rng)
        opt.zero_grad()
        loss.backward()
        if not losses:                          # the answers are scored from the frame: img_enc is reached
            assert brain.img_enc.patchify.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]          # the answers' words, at least, are learned


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return pretrain(tmp_path_factory.mktemp("pretrained"))


def stage_args(run_dir, steps, init):
    return [*SKILL_ARGS, "--run-dir", run_dir, "--steps", steps, "--batch-size", 14, "--warmup", 2, "--log-every", 2,
            "--save-every", 4, "--eval-every", 6, "--eval-scenes", 2, "--eval-frames", 8, "--replay-sentences", 32,
            "--plain-batch", 3, "--text-batch", 4, "--init-from", *init]


def test_a_few_steps_measure_accuracy_beside_chance_and_a_killed_run_resumes_exactly(tmp_path, pretrained):
    out = run_script("tutorial_qa.py", *stage_args(tmp_path / "a", 12, pretrained)).stdout
    for family in core.QA_FAMILIES:
        assert f"acc_{family} " in out and f"chance_{family} 0.5 " in out and f"example {family}: " in out
        assert f"forced_acc_{family} " in out      # the label's answer scored, not generated
    assert "plain_mse_ratio" in out and "text_loss_ratio" in out
    best = core.load_checkpoint(str(tmp_path / "a" / "tutorial_qa_best.pt"))
    assert 0 <= best["metrics"]["acc_mean"] <= 1 and best["metrics"]["acc_mean"] >= best["metrics"]["acc_min"]

    # the second run draws its scenes in a worker process: the same data, so the same weights
    code, _ = kill_when("tutorial_qa.py", "batch 6/12", *stage_args(tmp_path / "b", 12, pretrained), "--workers", 1)
    assert code == -signal.SIGKILL
    out = run_script("tutorial_qa.py", *stage_args(tmp_path / "b", 12, pretrained), "--resume", "--workers", 1).stdout
    assert "resuming from" in out
    a, b = (core.load_checkpoint(core.resolve_checkpoint(str(tmp_path / d))) for d in "ab")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_an_image_only_checkpoint_is_refused_with_what_is_missing(tmp_path, pretrained):
    bad = run_script("tutorial_qa.py", *stage_args(tmp_path, 2, pretrained[:1]), check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "text_enc" in bad.stderr and "tokenizer" in bad.stderr


def test_the_turn_probe_reads_a_brain_three_ways_and_names_bad_input(pretrained):
    image, text = pretrained
    out = run_script("benchmarks/probe_turn.py", "--ckpt", image, "--text", text, "--scenes", 40, "--held-out", 10,
                     "--steps", 4, "--every", 2, "--batch-size", 8, "--standardise", "--mlp-summary").stdout
    r2 = re.search(r"heading R² \(cos, sin\): keypoint token \[(\S+) +(\S+)\]", out)
    assert r2 and all(float(v) <= 1 for v in r2.groups())
    for reader in ("mlp step", "text_dec step"):
        accs = [float(a) for a in re.findall(rf"{reader} \d+: loss [\d.]+ \| turn[^\d]*([\d.]+)", out)]
        assert len(accs) == 2 and all(0 <= a <= 1 for a in accs), out
    no_text = run_script("benchmarks/probe_turn.py", "--ckpt", image, "--only", "text_dec", "--scenes", 20,
                         "--held-out", 5, check=False)
    assert no_text.returncode != 0 and "no tokenizer" in no_text.stderr and "Traceback" not in no_text.stderr
    bad = run_script("benchmarks/probe_turn.py", "--ckpt", image, "--scenes", 20, "--held-out", 20, check=False)
    assert bad.returncode == 2 and "--held-out must be between" in bad.stderr


def test_a_turn_phase_trains_the_reader_on_turn_alone_and_replays_the_other_families(tmp_path, pretrained):
    """The curriculum's turn phase: turn asked alone, every part frozen but the keypoint reader, the other
    families replayed; the reader learns the statistics of its scenes."""
    assert tutorial_qa.asked_families(0, 0, ["ahead", "turn"]) == ["turn", "ahead"]        # in FAMILY_ORDER
    assert tutorial_qa.asked_families(0, 5, ["near", "turn", "ahead"]) == ["near", "turn"]
    args = [*stage_args(tmp_path / "t", 4, pretrained), "--families", "turn", "--freeze", "img_enc", "img_dec",
            "text_enc", "text_dec", "--eval-every", 4]
    out = run_script("tutorial_qa.py", *args).stdout
    assert "asked_turn 1" in out and "asked_near" not in out and "text_loss_ratio 1 " in out
    replayed = [float(v) for v in re.findall(r"\| qa ([\d.]+) \|", out)]
    assert replayed and all(v > 0 for v in replayed)
    assert all(f"acc_{family} " in out for family in core.QA_FAMILIES)       # every family still measured
    ckpt = core.load_checkpoint(str(tmp_path / "t" / "tutorial_qa_best.pt"))
    assert ckpt["trained_parts"] == ["reader"] and ckpt["model"]["reader.seen"] == 8   # questions and replay, 4 batches
    for path, part in zip(pretrained, ("img_enc.", "text_dec.")):                       # the frozen parts
        before = core.load_checkpoint(path)["model"]
        assert all(torch.equal(v, ckpt["model"][k]) for k, v in before.items() if k.startswith(part))
    assert ckpt["model"]["reader.mlp.2.weight"].abs().sum() > 0
    bad = run_script("tutorial_qa.py", *args[:-2], "--families", "colour", check=False)
    assert bad.returncode == 2 and "invalid choice: 'colour'" in bad.stderr
    plain = run_script("tutorial_qa.py", *stage_args(tmp_path / "all", 2, pretrained), "--log-every", 1).stdout
    assert re.findall(r"\| qa ([\d.]+) \|", plain) == ["0", "0"]       # all seven asked: nothing to replay
