"""elmer-score against hand-computed values."""

import math

import pytest

from elmer_fairseq.score import parse_generate_log, score


def test_rouge_by_hand():
    # hyp "the cat sat" vs ref "the cat sat on the mat":
    # ROUGE-1: 3 of 3 hyp unigrams match, 3 of 6 ref -> F = 2 * 1 * 0.5 / 1.5
    # ROUGE-2: 2 of 2 hyp bigrams, 2 of 5 ref       -> F = 2 * 1 * 0.4 / 1.4
    # ROUGE-L: LCS 3                                 -> same as ROUGE-1
    result = score(["the cat sat"], ["the cat sat on the mat"])
    assert math.isclose(result["ROUGE-1"], 100 * 2 / 3, rel_tol=1e-6)
    assert math.isclose(result["ROUGE-2"], 100 * 0.8 / 1.4, rel_tol=1e-6)
    assert math.isclose(result["ROUGE-L"], 100 * 2 / 3, rel_tol=1e-6)
    assert score(["a b c d"], ["a b c d"])["BLEU"] == pytest.approx(100.0)


def test_parse_generate_log_prefers_detokenized_lines_and_orders_by_id():
    log = [
        "S-1\tsource one\n",
        "T-1\tref one\n",
        "H-1\t-0.5\t▁hyp ▁one\n",
        "D-1\t-0.5\thyp one\n",
        "T-0\tref zero\n",
        "H-0\t-0.2\t▁hyp ▁zero\n",
        "D-0\t-0.2\thyp zero\n",
        "Generate test with beam=5: BLEU4 = 0.00\n",
    ]
    hyps, refs = parse_generate_log(log)
    assert hyps == ["hyp zero", "hyp one"]
    assert refs == ["ref zero", "ref one"]


def test_parse_generate_log_refuses_missing_targets():
    with pytest.raises(ValueError, match="no T- line"):
        parse_generate_log(["H-0\t-0.1\thyp\n"])


def test_bleu_n_by_hand_and_against_sacrebleu():
    from elmer_fairseq.score import bleu_n

    # hyp "the cat the cat" vs ref "the cat sat on the mat": clipped unigrams the 2 + cat 1 = 3 of 4;
    # bigrams: "the cat" min(2, 1) = 1 of 3; c = 4 < r = 6 -> brevity exp(1 - 6/4)
    hyp, ref = ["The cat the cat"], ["the cat sat on the mat"]
    bp = math.exp(-0.5)
    assert bleu_n(hyp, ref, 1) == pytest.approx(100 * bp * 0.75)
    assert bleu_n(hyp, ref, 2) == pytest.approx(100 * bp * math.sqrt(0.75 / 3))
    assert bleu_n(hyp, ref, 4) == 0.0  # no 4-gram matches, no smoothing
    import sacrebleu

    hyps = ["the cat sat on a mat today", "a dog ran under the big tree", "red fast car"]
    refs = ["the cat sat on the mat today", "the dog ran under a big tree", "a red fast car"]
    expected = sacrebleu.corpus_bleu(hyps, [refs], tokenize="none", smooth_method="none").score
    assert bleu_n(hyps, refs, 4) == pytest.approx(expected, rel=1e-9)


def test_distinct_and_overall_by_hand():
    from elmer_fairseq.score import bleu_n

    hyps, refs = ["a b a b", "a c"], ["a b c d", "a c"]
    result = score(hyps, refs, task="personachat")
    assert result["Distinct-1"] == pytest.approx(100 * 3 / 6)  # {a, b, c} of a b a b a c
    assert result["Distinct-2"] == pytest.approx(100 * 3 / 4)  # {ab, ba, ac} of ab ba ab ac
    parts = [bleu_n(hyps, refs, 1), bleu_n(hyps, refs, 2), 50.0, 75.0]
    assert result["Overall"] == pytest.approx(sum(parts) / 4)
    assert list(result) == ["BLEU-1", "BLEU-2", "Distinct-1", "Distinct-2", "Overall", "sentences"]


class NoSynonyms:
    """A WordNet with no synsets: METEOR then matches exact words and Porter stems only."""

    def synsets(self, word):
        return []


def test_meteor_by_hand():
    from elmer_fairseq.score import meteor

    # hyp "the cat sat" vs ref "the cat sat on a mat": m = 3, P = 1, R = 1/2, one chunk
    # Fmean = P R / (0.9 P + 0.1 R); penalty = 0.5 (chunks / m)^3 = 0.5 (1/3)^3
    fmean = 0.5 / (0.9 + 0.05)
    expected = 100 * fmean * (1 - 0.5 / 27)
    assert meteor(["the cat sat"], ["the cat sat on a mat"], NoSynonyms()) == pytest.approx(expected)
    # "cats" matches "cat" by its stem; "mat sat" vs "sat mat": 2 matches in 2 chunks
    assert meteor(["cats run"], ["cat run"], NoSynonyms()) == pytest.approx(100 * (1 - 0.5 * (1 / 2) ** 3))
    assert meteor(["mat sat"], ["sat mat"], NoSynonyms()) == pytest.approx(100 * (1 - 0.5 * (2 / 2) ** 3))


def test_meteor_without_wordnet_is_reported_missing(tmp_path):
    from elmer_fairseq.score import load_wordnet, main

    (tmp_path / "h").write_text("what is the capital of france ?\n")
    (tmp_path / "r").write_text("what is the capital of france ?\n")
    result = main(["--hyp", str(tmp_path / "h"), "--ref", str(tmp_path / "r"), "--task", "squad_qg"])
    assert result["METEOR"] is None and result["BLEU-4"] == pytest.approx(100.0)
    with pytest.raises(FileNotFoundError, match="WordNet dict folder"):
        load_wordnet(str(tmp_path))
