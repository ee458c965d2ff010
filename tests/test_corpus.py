"""The text corpus: each input format, each bad input, the default corpus and the held-out split."""
import codecs

import pytest

import core
import pretrain_text as pt
from pretrain_text import CorpusError, CorpusWarning


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_sentences_csv_keeps_only_english(tmp_path):
    path = write(tmp_path / "sentences.csv",
                 "1\tcmn\t我们试试看！\n2\teng\tLet's try something.\n3\tfra\tEssayons.\n"
                 "4\teng\tI have to go to sleep.\n5\t\\N\tUnknown language.\n")
    stats = {}
    assert pt.read_corpus(path, stats=stats) == ["Let's try something.", "I have to go to sleep."]
    assert stats["format"] == "tatoeba" and stats["other_lang"] == 3 and stats["malformed"] == 0


def test_eng_sentences_tsv_keeps_quotes_literally(tmp_path):
    path = write(tmp_path / "eng_sentences.tsv",
                 '1276\teng\tHe said "no" and left.\n1277\teng\t"Why?" she asked.\n'
                 "1278\teng\tIt's 5 o'clock, isn't it?\n")
    assert pt.read_corpus(path) == ['He said "no" and left.', '"Why?" she asked.',
                                    "It's 5 o'clock, isn't it?"]


def test_another_language_can_be_kept(tmp_path):
    path = write(tmp_path / "sentences.csv", "1\teng\tHello.\n2\tfra\tBonjour.\n")
    assert pt.read_tatoeba(path, lang="fra") == ["Bonjour."]


def test_plain_text_one_sentence_per_line(tmp_path):
    path = write(tmp_path / "mine.txt", "The cat sat.\n\n  Dogs bark.  \r\nA tab\there is fine.\n")
    stats = {}
    assert pt.read_corpus(path, stats=stats) == ["The cat sat.", "Dogs bark.", "A tab\there is fine."]
    assert stats["format"] == "lines"


def test_several_corpora_are_merged_deduplicated_and_shuffled(tmp_path, capsys):
    tatoeba = write(tmp_path / "eng_sentences.tsv", "1\teng\tOne.\n2\teng\tTwo.\n3\teng\tShared.\n")
    plain = write(tmp_path / "more.txt", "Three.\nShared.\n")
    sentences, counts = pt.load_sentences([str(tatoeba), str(plain)], seed=0)
    assert sorted(sentences) == ["One.", "Shared.", "Three.", "Two."]
    assert counts == {str(tatoeba): 3, str(plain): 2}
    assert pt.load_sentences([str(tatoeba), str(plain)], seed=0)[0] == sentences
    out = capsys.readouterr().out
    assert "tatoeba" in out and "lines" in out and "total 4" in out


def test_malformed_tatoeba_lines_are_counted_skipped_and_reported(tmp_path):
    path = write(tmp_path / "sentences.csv",
                 "1\teng\tGood one.\n"
                 "x2\teng\tThe id is not a number.\n"  # line 2
                 "3\teng\n"  # too few fields
                 "4\teng\t   \n"  # empty text
                 "5\teng\tToo\tmany fields.\n"
                 "6\teng\tGood two.\n")
    stats = {}
    with pytest.warns(CorpusWarning) as caught:
        sentences = pt.read_corpus(path, stats=stats)
    assert sentences == ["Good one.", "Good two."]
    assert stats["malformed"] == 4 and stats["first_malformed_line"] == 2
    message = str(caught[0].message)
    assert str(path) in message and "4 malformed" in message and "line 2" in message


@pytest.mark.parametrize("name, good", [("sentences.csv", "1\teng\tFine.\n3\teng\tAlso fine.\n"),
                                        ("plain.txt", "Fine.\nAlso fine.\n")])
def test_non_utf8_lines_are_skipped_and_reported(tmp_path, name, good):
    first, second = good.encode().split(b"\n")[:2]
    bad = "2\teng\tCaf\xe9 au lait." if name.endswith(".csv") else "Caf\xe9 au lait."
    path = tmp_path / name
    path.write_bytes(first + b"\n" + bad.encode("latin-1") + b"\n" + second + b"\n")
    stats = {}
    with pytest.warns(CorpusWarning, match=r"1 line.*not UTF-8.*line 2"):
        sentences = pt.read_corpus(path, stats=stats)
    assert sentences == ["Fine.", "Also fine."] and stats["not_utf8"] == 1


def test_a_tab_separated_file_of_another_kind_is_reported_not_read_as_text(tmp_path):
    path = write(tmp_path / "pairs.tsv", "Go.\tVa !\nHi.\tSalut !\n")
    with pytest.warns(CorpusWarning, match="2 malformed"), pytest.raises(CorpusError, match="2 malformed"):
        pt.read_corpus(path)


def test_a_file_of_latin1_only_is_an_empty_corpus(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Caf\xe9.\nNa\xefve.\n".encode("latin-1"))
    with pytest.warns(CorpusWarning), pytest.raises(CorpusError, match="empty"):
        pt.read_corpus(path)


def test_missing_file_is_a_clear_error(tmp_path):
    path = tmp_path / "nope.tsv"
    with pytest.raises(CorpusError, match="not found") as error:
        pt.load_sentences([str(path)], seed=0)
    assert str(path) in str(error.value)


def test_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CorpusError, match="directory") as error:
        pt.read_corpus(tmp_path)
    assert str(tmp_path) in str(error.value)


@pytest.mark.parametrize("text", ["", "\n\n   \n"])
def test_empty_file_is_a_clear_error(tmp_path, text):
    path = write(tmp_path / "empty.txt", text)
    with pytest.raises(CorpusError, match="empty") as error:
        pt.read_corpus(path)
    assert str(path) in str(error.value)


def test_tatoeba_without_the_language_is_a_clear_error(tmp_path):
    path = write(tmp_path / "sentences.csv", "1\tfra\tBonjour.\n2\tdeu\tHallo.\n")
    with pytest.raises(CorpusError, match="no 'eng' sentences among 2 in other languages and 0 malformed"):
        pt.read_corpus(path)


@pytest.fixture(scope="module")
def default():
    return pt.default_corpus(seed=0)


def test_default_corpus_size_and_sources(default):
    sentences, counts = default
    assert 40_000 <= len(sentences) <= 80_000
    assert len(set(sentences)) == len(sentences) == sum(counts.values())
    assert counts["wordnet"] > 40_000 and counts["fortunes"] > 8_000
    assert 0.02 < counts["game"] / len(sentences) < 0.08


def test_default_corpus_holds_real_wordnet_examples_and_fortunes(default):
    sentences = set(default[0])
    assert "She choked with emotion when she spoke about her deceased husband." in sentences  # choke, v
    assert "The mountain climber started to hyperventilate." in sentences
    assert "Never trust an operating system." in sentences  # fortunes
    assert "Many hands make light work." in sentences  # its "-- John Heywood" dropped
    assert "I" not in sentences and not any(s.startswith("This software and database") for s in sentences)
    assert all(len(s) <= pt.MAX_CHARS and s.isprintable() for s in sentences)  # no fortune overstrikes


def test_default_corpus_skips_the_offensive_files(default):
    sentences = set(default[0])
    only_in_o_files = ["It's always the wrong time of the month.",  # murphy-o
                       "Absinthe makes the tart grow fonder."]  # fortunes-o
    for entry in only_in_o_files:
        assert entry not in sentences
        assert codecs.encode(entry, "rot13") not in sentences  # the -o files are stored rot13-encoded
    assert not any(s.startswith("The limerick is furtive and mean") for s in sentences)


def test_default_corpus_is_deterministic_by_seed(default):
    again, counts = pt.default_corpus(seed=0)
    assert again == default[0] and counts == default[1]
    other, _ = pt.default_corpus(seed=1)
    assert other != again
    assert set(other) - set(again) <= set(pt.game_sentences(10_000, seed=1))  # only the game share differs


def test_game_sentences_speak_the_game_and_follow_the_seed():
    sentences = pt.game_sentences(500, seed=3)
    assert len(set(sentences)) == 500 and sentences == pt.game_sentences(500, seed=3)
    assert sentences != pt.game_sentences(500, seed=4)
    words = set(" ".join(pt.game_sentences(10_000, seed=0)).lower().replace(".", " ").split())
    assert {"gold", "agent", "left", "right", "above", "below", "turn", "forward", "wall", "line"} <= words
    assert "Please draw the straight line to the gold from the agent." in pt._game_pool()


def test_heldout_split_is_disjoint_deterministic_and_order_free():
    sentences = [f"Sentence number {i}." for i in range(1000)] + ["Sentence number 7."]
    train, heldout = pt.split_heldout(sentences, frac=0.02, seed=0)
    assert len(heldout) == 20 and len(train) == 980
    assert not set(train) & set(heldout)
    assert set(pt.split_heldout(sentences[::-1], frac=0.02, seed=0)[1]) == set(heldout)
    assert set(pt.split_heldout(sentences, frac=0.02, seed=1)[1]) != set(heldout)


def test_heldout_sentences_split_into_validation_and_test_halves_alike_in_any_order():
    heldout = pt.split_heldout([f"Sentence number {i}." for i in range(1000)], frac=0.05, seed=0)[1]
    val, test = core.heldout_sentences(heldout, "val"), core.heldout_sentences(heldout, "test")
    assert len(val) == 25 and len(test) == 25 and not set(val) & set(test) and set(val) | set(test) == set(heldout)
    assert val == [s for s in heldout if s in set(val)]                    # in the checkpoint's order
    assert set(core.heldout_sentences(heldout[::-1], "val")) == set(val)   # membership by the set, not the order
    assert len(core.heldout_sentences(heldout[:7], "val")) == 4 and core.heldout_sentences(None, "test") == []
    assert core.heldout_sentences(["One."], "val") == core.heldout_sentences(["One."], "test") == ["One."]
    with pytest.raises(ValueError, match="split must be one of test, val, not 'train'"):
        core.heldout_sentences(heldout, "train")


def test_heldout_split_of_a_tiny_corpus_still_holds_one_out():
    train, heldout = pt.split_heldout(["A b.", "C d.", "E f."], frac=0.02)
    assert len(heldout) == 1 and len(train) == 2
