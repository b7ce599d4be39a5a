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
