"""core.py by example: the brain's calls, the tokenizer, checkpoints, and the run plumbing."""
import argparse
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import core

from conftest import ROOT, SMALL_ARGS, kill_when, payload, run_script, script_env

SMALL = dict(img_size=32, patch=8, width=32, img_heads=2, text_heads=2, value_heads=2, vocab=300)
SENTENCES = ["The gold is to the left of the agent.", "Turn right to face the gold.", "A cat sat on the mat.",
             "Is the gold ahead of you?", "Please draw the straight line to the gold from the agent."] * 20


def small_brain(seed=0, **kw):
    torch.manual_seed(seed)
    return core.Brain(core.make_config("tiny", **{**SMALL, **kw}))


def run_toy(tmp_path, *args, check=True):
    return run_script("tests/toy_stage.py", "--run-dir", tmp_path / "run", *SMALL_ARGS, *args, check=check)


# ---- presets and the brain

def test_presets_are_one_table_and_overridable():
    base = core.make_config("base")
    assert (base.img_size, base.patch, base.width, base.img_enc_layers, base.img_dec_layers) == (224, 14, 768, 6, 3)
    assert (base.text_enc_layers, base.text_dec_layers, base.vocab, base.seq_len) == (8, 4, 10000, 32)
    assert core.make_config("tiny", width=64).width == 64
    with pytest.raises(ValueError, match="patch"):
        core.make_config("tiny", img_size=100, patch=12)
    with pytest.raises(ValueError, match="preset"):
        core.make_config("huge")


def test_shapes_of_the_calls_the_user_knows():
    brain = small_brain()
    img, text = torch.rand(2, 3, 32, 32), torch.randint(12, 64, (2, 32))
    logits, recon = brain(text, img)
    assert logits.shape == (2, 32, 300) and recon.shape == (2, 3, 32, 32)
    assert brain.img_autoencoder(img).shape == (2, 3, 32, 32)
    assert brain.sentence_autoencoder(text).shape == (2, 32, 300)
    assert brain.evaluate_text(text, brain.image_context(img)).shape == (2, 32)
    two = brain.two_img_context(img, img)
    assert two.shape == (2, 34, 32)     # per image the keypoint token and 16 patch tokens, twice
    assert not torch.allclose(two[:, :17], two[:, 17:])   # the tags tell the two images apart


@pytest.mark.parametrize("colour", ["gold", "agent", "eye", "wall"])
def test_a_fresh_brain_has_keypoints_that_follow_each_colour(colour):
    # the keypoint token's reason to exist: coordinates of things, readable from the first batch
    brain = core.Brain(core.make_config("tiny"))
    frames = torch.ones(5, 3, 96, 96)
    xs = [10, 30, 50, 70, 86]
    for i, x in enumerate(xs):
        frames[i, :, 40:44, x - 2: x + 2] = torch.tensor(core.PALETTE[colour], dtype=torch.float)[:, None, None] / 255
    where, _ = brain.img_enc.keypoints.locate(frames * 2 - 1)
    true_x = torch.tensor([(x - 0.5) / 47.5 - 1 for x in xs])      # pixel centres in [-1, 1]
    follows = ((where[:, :, 0] - true_x[:, None]).abs() < 0.1).all(0)    # (K,): this keypoint tracks it
    assert follows.any()
    assert not ((where[:, :, 0] - where[:1, :, 0]).abs() < 0.1).all()    # and it is not a constant


def test_text_logits_at_t_never_see_tokens_after_t():
    brain = small_brain()
    img = torch.rand(3, 3, 32, 32)
    text = torch.randint(12, 64, (3, 32))
    for t in (0, 5, 30):
        changed = text.clone()
        changed[:, t + 1:] = torch.randint(12, 64, changed[:, t + 1:].shape)
        for call in (lambda x: brain(x, img)[0], brain.sentence_autoencoder,
                     lambda x: brain.evaluate_text(x, brain.image_context(img)),
                     lambda x: brain.qa_forward(x, img, torch.ones_like(x, dtype=torch.bool))[0]):
            assert torch.allclose(call(text)[:, : t + 1], call(changed)[:, : t + 1], atol=1e-6)
            assert not torch.allclose(call(text)[:, t + 1:], call(changed)[:, t + 1:])


def test_qa_forward_rebuilds_the_image_from_the_question_only():
    brain = small_brain()
    img = torch.rand(2, 3, 32, 32)
    text = torch.randint(12, 64, (2, 32))
    question = torch.zeros_like(text, dtype=torch.bool)
    question[:, :10] = True
    changed = text.clone()
    changed[:, 10:] = torch.randint(12, 64, (2, 22))
    assert torch.allclose(brain.qa_forward(text, img, question)[1], brain.qa_forward(changed, img, question)[1], atol=1e-6)
    assert not torch.allclose(brain(text, img)[1], brain(changed, img)[1])


@pytest.mark.parametrize("temperature,allowed", [(1.0, None), (0.7, core.ACTION_TOKENS + [core.EOS])])
def test_scoring_a_sample_gives_the_probabilities_it_was_sampled_with(temperature, allowed):
    brain = small_brain()
    with torch.no_grad():      # a reader that has learned something (a fresh one adds zero)
        brain.reader.mlp[-1].weight.normal_(std=0.5)
    brain.text_logits(torch.full((4, 2), core.BOS), brain.image_context(torch.rand(4, 3, 32, 32)))   # statistics
    ctx = brain.image_context(torch.rand(4, 3, 32, 32))
    text = torch.full((4, 32), core.PAD)
    text[:, 0] = core.BOS
    text[2:, 1] = 20                      # prompts of different lengths
    lengths = torch.tensor([1, 1, 2, 2])
    sample = brain.generate(text, lengths, ctx, 12, temperature, allowed, torch.Generator().manual_seed(1))
    logp, entropy = brain.compute_probabilities(sample.tokens, ctx, temperature, allowed)
    for row in range(4):
        steps = sample.sampled[row].nonzero().squeeze(1)
        at = lengths[row] - 1 + steps             # the token at position p+1 is scored by the logits at p
        assert torch.allclose(logp[row, at], sample.logprobs[row, steps], atol=1e-5)
        assert torch.allclose(entropy[row, at], sample.entropies[row, steps], atol=1e-5)
        if allowed:
            assert set(sample.tokens[row, lengths[row]: sample.lengths[row]].tolist()) <= set(allowed)


def test_keypoint_reader_learns_statistics_of_image_contexts_only_and_reads_each_row_alone():
    brain = small_brain()
    reader, text = brain.reader, torch.full((6, 3), core.BOS)
    img = torch.rand(6, 3, 32, 32)
    with torch.no_grad():      # fresh, the reader adds nothing: a brain that gains it answers as before
        assert not reader(brain.image_context(img)[:, :1]).any()
    # the first batch sets the statistics to its own; "no image", no_grad and eval mode leave them
    brain.text_logits(text, brain.image_context(img))
    said = brain.sentence_autoencoder(text)
    with torch.no_grad():
        reader.mlp[-1].weight.normal_(std=0.5)
    assert torch.equal(said, brain.sentence_autoencoder(text))      # "no image" is not read by the reader
    token = brain.image_context(img)[:, 0].detach()
    assert reader.seen == 1 and torch.allclose(reader.mean, token.mean(0), atol=1e-6)
    assert torch.allclose(reader.var, token.var(0, unbiased=False), atol=1e-6)
    state = {k: v.clone() for k, v in reader.state_dict().items() if not k.startswith("mlp")}
    brain.sentence_autoencoder(text)
    with torch.no_grad():
        brain.text_logits(text, brain.image_context(img))
    brain.eval()
    brain.text_logits(text, brain.image_context(img))
    brain.train()
    assert all(torch.equal(v, reader.state_dict()[k]) for k, v in state.items())
    # then running averages; a batch of one is not folded in; a row reads the same alone as in any batch
    brain.text_logits(text, brain.image_context(torch.rand(6, 3, 32, 32)))
    brain.text_logits(text[:1], brain.image_context(img[:1]))
    assert reader.seen == 2 and not torch.equal(reader.mean, state["mean"])
    with torch.no_grad():
        alone = brain.text_logits(text[:1], brain.image_context(img[:1]))
        assert torch.allclose(alone, brain.text_logits(text, brain.image_context(img))[:1], atol=1e-5)
        assert not torch.allclose(alone, brain.text_logits(text[:1], brain.image_context(img[1:2])), atol=1e-3)


def test_generation_stops_a_row_at_end_token():
    brain = small_brain()
    with torch.no_grad():
        brain.text_dec.head[-1].bias.fill_(-100.0)
        brain.text_dec.head[-1].bias[core.EOS] = 100.0     # the brain always says </s>
    text = torch.full((2, 32), core.PAD)
    text[:, 0] = core.BOS
    sample = brain.generate(text, torch.tensor([1, 1]), brain.null_image(2), 10)
    assert sample.lengths.tolist() == [2, 2] and (sample.tokens[:, 1] == core.EOS).all()
    assert sample.sampled.sum().item() == 2


# ---- tokenizer

def test_tokenizer_special_ids_padding_and_round_trip():
    tok = core.Tokenizer.train(SENTENCES, 200)
    assert core.PAD != core.BOS and tok.tok.token_to_id("<pad>") == core.PAD
    assert [tok.tok.id_to_token(i) for i in core.ACTION_TOKENS] == ["<noop>", "<forward>", "<backward>", "<left>", "<right>"]
    ids = tok.encode(["Turn right to face the gold.", "A cat"], 32)
    assert ids.shape == (2, 32) and ids[0, 0] == core.BOS and ids[1, -1] == core.PAD
    assert tok.decode(ids[0]) == "Turn right to face the gold."
    long = tok.encode([" ".join(["gold"] * 40)], 8)
    assert long[0, -1] == core.EOS and (long[0] != core.PAD).all()      # truncated, still ended
    again = core.Tokenizer.from_json(tok.to_json())
    assert torch.equal(again.encode(SENTENCES[:5], 32), tok.encode(SENTENCES[:5], 32))
    toks, q, a = tok.encode_qa(["Is the gold ahead?"], ["Yes."], 32)
    assert toks[0, q[0].sum() - 1] == core.SEP and toks[0, a[0].nonzero()[-1]] == core.EOS
    assert not (q & a).any()


# ---- checkpoints

def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(core.CheckpointError, match="no checkpoint"):
        core.load_checkpoint(str(tmp_path / "missing.pt"))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(core.CheckpointError, match="corrupt"):
        core.load_checkpoint(str(junk))
    evil = tmp_path / "evil.pt"
    torch.save({"format": core.FORMAT, "x": core.BrainConfig()}, evil)      # an arbitrary pickled object
    with pytest.raises(core.CheckpointError, match="arbitrary pickled"):
        core.load_checkpoint(str(evil))
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(core.CheckpointError, match="not a checkpoint of this project"):
        core.load_checkpoint(str(other))


def test_load_brain_gives_the_saved_brain_and_refuses_weights_that_do_not_fit(tmp_path):
    brain = small_brain()
    os.makedirs(tmp_path / "run")
    keeper = core.Keeper(str(tmp_path / "run"), "toy")
    keeper.save({**payload(brain), "optimizer": {"state": {}}, "rng": {"python": 1}}, 1, metric=0.5)
    loaded, ckpt, path = core.load_brain(str(tmp_path / "run" / "best"))
    assert path.endswith("toy_best.pt") and not loaded.training and loaded.cfg == brain.cfg
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in brain.state_dict().items())
    assert ckpt["stage"] == "toy" and not {"model", "optimizer", "rng"} & set(ckpt)
    wider = payload(brain)
    wider["config"]["width"] *= 2                     # the weights of one brain under another's sizes
    core.atomic_save(wider, str(tmp_path / "wider.pt"))
    with pytest.raises(core.CheckpointError, match="wider.pt: its weights do not fit its config"):
        core.load_brain(str(tmp_path / "wider.pt"))


def test_truncated_checkpoint_is_skipped_for_the_previous(tmp_path):
    brain = small_brain()
    keeper = core.Keeper(str(tmp_path), "toy", keep_last=5)
    first = keeper.save(payload(brain, batch=1), 1)
    second = keeper.save(payload(brain, batch=2), 2)
    data = open(second, "rb").read()
    open(second, "wb").write(data[: len(data) // 2])
    messages = []
    path, ckpt = core.latest_checkpoint(str(tmp_path), "toy", log=messages.append)
    assert path == first and ckpt["batch"] == 1
    assert "truncated" in messages[0] and os.path.basename(second) in messages[0]


def test_retention_keeps_last_every_and_best_and_never_deletes_foreign_files(tmp_path):
    brain = small_brain()
    foreign = tmp_path / "toy_20250101T000000000Z_batch00000001.pt"   # the user's own file, same naming
    foreign.write_bytes(b"mine")
    keeper = core.Keeper(str(tmp_path), "toy", keep_last=2, keep_every=4)
    metrics = {1: 5.0, 2: 1.0, 3: 3.0, 4: 4.0, 5: 6.0, 6: 7.0, 7: 8.0}
    for b, m in metrics.items():
        keeper.save(payload(brain, batch=b), b, metric=m)
    batches = sorted(core.parse_checkpoint_name(p)[1] for p in glob.glob(str(tmp_path / "toy_2*.pt")))
    assert batches == [1, 2, 4, 6, 7]                  # foreign 1, best 2, every-4th 4, last two 6 and 7
    assert foreign.read_bytes() == b"mine"
    best = core.resolve_checkpoint(str(tmp_path / "best"))
    assert core.load_checkpoint(best)["batch"] == 2
    assert core.load_checkpoint(core.resolve_checkpoint(str(tmp_path)))["batch"] == 7


def test_a_kill_during_saving_leaves_every_checkpoint_whole(tmp_path):
    code = ("import sys, torch, core\n"
            "k = core.Keeper(sys.argv[1], 'toy', keep_last=2)\n"
            "b = 0\n"
            "while True:\n"
            "    b += 1\n"
            "    k.save({'format': core.FORMAT, 'stage': 'toy', 'batch': b, 'w': torch.randn(400_000)}, b)\n"
            "    print(b, flush=True)\n")
    for delay in (0.0, 0.011, 0.037, 0.07):        # kill at different instants of a save
        proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE)
        proc.stdout.readline()
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for path in glob.glob(str(tmp_path / "toy_*.pt")):
            assert core.load_checkpoint(path)["w"].shape == (400_000,)
        for leftover in glob.glob(str(tmp_path / "*.tmp*")):
            os.remove(leftover)     # a half-written temporary is never taken for a checkpoint
        assert core.latest_checkpoint(str(tmp_path), "toy")[1] is not None


def test_init_from_takes_each_part_from_the_stage_that_trained_it(tmp_path):
    tok = core.Tokenizer.train(SENTENCES, 300)      # byte-level: 256 bytes + specials at least
    image_brain, text_brain = small_brain(seed=1), small_brain(seed=2, vocab=tok.vocab)
    torch.save(payload(image_brain, "pretrain_image", trained=("img_enc", "img_dec")), tmp_path / "img.pt")
    torch.save(payload(text_brain, "pretrain_text", trained=("text_enc", "text_dec"), tokenizer=tok.to_json()),
               tmp_path / "text.pt")
    brain = small_brain(seed=3, vocab=tok.vocab)
    fresh_value = brain.value.out.weight.clone()
    tokenizer, origins = core.init_from(brain, [str(tmp_path / "img.pt"), str(tmp_path / "text.pt")], log=lambda m: None)
    assert torch.equal(brain.img_enc.patchify.weight, image_brain.img_enc.patchify.weight)
    assert torch.equal(brain.text_dec.head[-1].weight, text_brain.text_dec.head[-1].weight)
    assert torch.equal(brain.value.out.weight, fresh_value)
    assert tokenizer == tok.to_json() and set(origins) == {"img_enc", "img_dec", "text_enc", "text_dec"}
    with pytest.raises(core.CheckpointError, match="width: 48 vs 32"):
        core.init_from(small_brain(width=48), [str(tmp_path / "img.pt")], log=lambda m: None)
    # a checkpoint from an older core.py, whose text_dec had no summary map: named, not a traceback
    old = payload(text_brain, "pretrain_text", trained=("text_enc", "text_dec"), tokenizer=tok.to_json())
    old["model"] = {k: v for k, v in old["model"].items() if not k.startswith("text_dec.summary")}
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(core.CheckpointError, match="its text_dec does not have this brain's weights "
                                                   r"\(missing summary.weight, missing summary.bias\)"):
        core.init_from(brain, [str(tmp_path / "old.pt")], log=lambda m: None)
    # an image checkpoint from before the strokes (its config has no such field) had none: it fits a brain
    # without strokes, and a brain with them is told why not
    stroke_less = small_brain(seed=4, strokes=0)
    older = payload(stroke_less, "pretrain_image", trained=("img_enc", "img_dec"))
    del older["config"]["strokes"]
    torch.save(older, tmp_path / "older.pt")
    bare = small_brain(seed=3, vocab=tok.vocab, strokes=0)
    core.init_from(bare, [str(tmp_path / "older.pt")], log=lambda m: None)
    assert torch.equal(bare.img_dec.unpatchify.weight, stroke_less.img_dec.unpatchify.weight)
    assert brain.cfg.strokes == 1                                   # the default brain paints a stroke
    with pytest.raises(core.CheckpointError, match="its img_dec does not fit this brain \\(strokes: 1 vs 0\\)"):
        core.init_from(brain, [str(tmp_path / "older.pt")], log=lambda m: None)


# ---- the run plumbing, through a real stage process

def test_run_logs_config_then_lines_and_metrics(tmp_path):
    out = run_toy(tmp_path).stdout
    log = open(tmp_path / "run" / "train.log").read().splitlines()
    assert "config" in log[0] and '"preset": "tiny"' in log[0]
    assert any("batch 3/6 | loss" in line and "samples/s" in line and "eta" in line for line in log)
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert {r["kind"] for r in records} == {"train", "eval"}
    assert out.count("saved") >= 3
    ckpt = core.load_checkpoint(core.resolve_checkpoint(str(tmp_path / "run")))
    assert ckpt["batch"] == 6 and ckpt["trained_parts"] == ["img_enc", "img_dec"]
    assert set(ckpt["rng"]) >= {"python", "numpy", "torch"} and ckpt["args"]["steps"] == 6


def test_freeze_and_learning_rates_per_part(tmp_path):
    run_toy(tmp_path, "--freeze", "img_enc", "--lr-img-dec", "0.01", "--steps", "2", "--warmup", "1")
    ckpt = core.load_checkpoint(core.resolve_checkpoint(str(tmp_path / "run")))
    torch.manual_seed(0)
    init = core.Brain(core.BrainConfig(**ckpt["config"])).state_dict()
    assert torch.equal(ckpt["model"]["img_enc.patchify.weight"], init["img_enc.patchify.weight"])
    assert not torch.equal(ckpt["model"]["img_dec.unpatchify.weight"], init["img_dec.unpatchify.weight"])
    assert ckpt["trained_parts"] == ["img_dec"]
    assert {g["base_lr"] for g in ckpt["optimizer"]["param_groups"]} == {0.01}


def test_freeze_modules_inside_a_part(tmp_path):
    """--freeze img_enc.patchify img_enc.blocks: img_enc trains its keypoint heat maps only, and is still a
    trained part (later stages take it from this checkpoint)."""
    run_toy(tmp_path, "--freeze", "img_enc.patchify", "img_enc.blocks", "--steps", "2", "--warmup", "1")
    ckpt = core.load_checkpoint(core.resolve_checkpoint(str(tmp_path / "run")))
    torch.manual_seed(0)
    init = core.Brain(core.BrainConfig(**ckpt["config"])).state_dict()
    same = {k for k in init if k.startswith("img_enc.") and torch.equal(ckpt["model"][k], init[k])}
    assert {k for k in init if k.startswith(("img_enc.patchify.", "img_enc.blocks."))} <= same
    assert "img_enc.keypoints.heat.weight" not in same and "img_enc.ln.weight" not in same
    assert ckpt["trained_parts"] == ["img_enc", "img_dec"]
    bad = run_toy(tmp_path / "b", "--freeze", "img_enc.stem", "--steps", "1", check=False)
    assert bad.returncode == 2 and "img_enc has no module or parameter 'stem'" in bad.stderr
    assert "keypoints" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_toy(tmp_path / "c", "--freeze", "eyes.blocks", "--steps", "1", check=False)
    assert bad.returncode == 2 and "'eyes.blocks': not a part of the brain" in bad.stderr


def test_resume_after_sigkill_is_bitwise_identical(tmp_path):
    run_toy(tmp_path / "a", "--steps", "8", "--dump", str(tmp_path / "a.w"))
    code, _ = kill_when("tests/toy_stage.py", "batch 5/8", "--run-dir", tmp_path / "b" / "run", *SMALL_ARGS,
                        "--steps", "8", "--sleep", "0.4")       # killed between two saves
    assert code == -signal.SIGKILL
    out = run_toy(tmp_path / "b", "--steps", "8", "--resume", "--dump", str(tmp_path / "b.w")).stdout
    assert "resuming from" in out and "batch 4" in out
    a, b = torch.load(tmp_path / "a.w.0"), torch.load(tmp_path / "b.w.0")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    code, out = kill_when("tests/toy_stage.py", "batch 3/", "--run-dir", tmp_path / "run", *SMALL_ARGS,
                          "--steps", "1000", "--sleep", "0.2", "--save-every", "0", "--eval-every", "0",
                          sig=signal.SIGTERM)
    assert code == 0 and "stopped by SIGTERM" in out
    assert 3 <= core.load_checkpoint(core.resolve_checkpoint(str(tmp_path / "run")))["batch"] < 1000


def test_non_finite_losses_are_skipped_then_rolled_back(tmp_path):
    out = run_toy(tmp_path, "--steps", "12", "--nan-at", "3", "7", "8", "9", "--max-bad-steps", "3").stdout
    assert "batch 3: non-finite loss" in out and "rolled back weights and optimizer" in out
    ckpt = core.load_checkpoint(core.resolve_checkpoint(str(tmp_path / "run")))
    assert ckpt["skipped"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.slow
def test_clear_errors_not_tracebacks(tmp_path):
    bad = run_toy(tmp_path, "--gpu", "3", check=False)
    assert bad.returncode == 2 and "--gpu 3: there is no such GPU" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_toy(tmp_path, "--device", "quantum", check=False)
    assert bad.returncode == 2 and "'quantum' is not a device" in bad.stderr
    bad = run_toy(tmp_path, "--init-from", str(tmp_path / "nope.pt"), check=False)
    assert bad.returncode == 2 and "no checkpoint at" in bad.stderr
    (tmp_path / "notckpt.pt").write_text("hello")
    bad = run_toy(tmp_path, "--init-from", str(tmp_path / "notckpt.pt"), check=False)
    assert bad.returncode == 2 and "not a checkpoint" in bad.stderr
    run_toy(tmp_path, "--steps", "2")
    again = run_toy(tmp_path, "--steps", "2", check=False)            # the run folder is not overwritten
    assert again.returncode == 2 and "--resume" in again.stderr
    mismatch = run_toy(tmp_path, "--run-dir", str(tmp_path / "r2"), "--width", "48",
                       "--init-from", core.resolve_checkpoint(str(tmp_path / "run")), check=False)
    assert mismatch.returncode == 2 and "width: 48 vs 32" in mismatch.stderr
    os.makedirs(tmp_path / "other")
    (tmp_path / "other" / "pretrain_text_20250101T000000000Z_batch00000001.pt").write_bytes(b"x")
    other = run_toy(tmp_path, "--run-dir", str(tmp_path / "other"), check=False)
    assert other.returncode == 2 and "another stage" in other.stderr


def test_counts_out_of_range_are_refused_by_name(tmp_path):
    bad = run_toy(tmp_path, "--steps", "0", check=False)
    assert bad.returncode == 2 and "--steps: must be 1 or more, not 0" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_toy(tmp_path, "--eval-every", "-5", check=False)
    assert bad.returncode == 2 and "--eval-every: must be 0 or more, not -5" in bad.stderr
    bad = run_toy(tmp_path, "--batch-size", "eight", check=False)
    assert bad.returncode == 2 and "--batch-size: not a whole number: 'eight'" in bad.stderr
    bad = run_script("trick_line.py", "--run-dir", tmp_path / "line", "--replay-sentences", "0", check=False)
    assert bad.returncode == 2 and "--replay-sentences: must be 1 or more, not 0" in bad.stderr
    assert not os.path.exists(tmp_path / "run") and not os.path.exists(tmp_path / "line")    # nothing was started


def test_settings_out_of_range_are_refused_by_name(tmp_path):
    share, positive = core.in_range(0, 1, high_open=True), core.in_range(0, low_open=True)
    assert share("0") == 0.0 and share("0.5") == 0.5 and positive("3e-5") == 3e-5
    for parse, text, says in [(share, "1", "must be in [0, 1), not 1"), (share, "-0.1", "must be in [0, 1), not -0.1"),
                              (positive, "0", "must be more than 0, not 0"), (positive, "nan", "not nan"),
                              (positive, "inf", "not inf"), (positive, "fast", "not a number: 'fast'")]:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(says)):
            parse(text)
    # through the scripts: exit 2, the flag named, nothing started
    for script, flag, value, says in [
            ("rl_grpo.py", "--temperature", "0", "--temperature: must be more than 0, not 0"),
            ("rl_grpo.py", "--group-size", "1", "--group-size: must be 2 or more, not 1"),
            ("rl_fake_traces.py", "--dagger", "1.5", "--dagger: must be in [0, 1], not 1.5"),
            ("tutorial_qa.py", "--plain-weight", "-1", "--plain-weight: must be 0 or more, not -1"),
            ("pretrain_image.py", "--patch", "0", "--patch: must be 1 or more, not 0")]:
        bad = run_script(script, "--run-dir", tmp_path / "run", flag, value, check=False)
        assert bad.returncode == 2 and says in bad.stderr and "Traceback" not in bad.stderr, (script, bad.stderr)
    assert not os.path.exists(tmp_path / "run")

def test_replay_bank_follows_the_run_length():
    def count(steps, text_batch=32, given=None, text_trains=True):
        return core.replay_count(argparse.Namespace(steps=steps, text_batch=text_batch, replay_sentences=given),
                                 text_trains)
    assert count(1500) == 16384               # 48,000 draws: each sentence about three times
    assert count(400) == 12800                # one sentence per draw
    assert count(12) == 1024                  # a short run still gets a bank worth measuring
    assert count(1500, given=64) == 64        # --replay-sentences wins
    assert count(1500, text_trains=False) == 1024      # a frozen text model is not trained on them


def test_ddp_two_processes_keep_identical_weights(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           os.path.join(ROOT, "tests", "toy_stage.py"), "--run-dir", str(tmp_path / "run"),
           *SMALL_ARGS, "--steps", "4", "--read", "--dump", str(tmp_path / "w")]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=180, env=script_env())
    w0, w1 = torch.load(tmp_path / "w.0"), torch.load(tmp_path / "w.1")
    # the weights, and the keypoint reader's statistics of each rank's own frames, averaged over the ranks
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert w0["reader.seen"] == 4 and not torch.equal(w0["reader.var"], torch.ones(32))
    torch.manual_seed(0)
    init = core.Brain(core.make_config("tiny", **SMALL)).state_dict()
    assert not torch.equal(w0["img_dec.unpatchify.weight"], init["img_dec.unpatchify.weight"])
    log = open(tmp_path / "run" / "train.log").read()
    assert '"world_size": 2' in log
