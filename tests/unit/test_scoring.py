"""Eval scoring functions against hand-computed values (chrF worked through its formula)."""

from __future__ import annotations

import pytest

from training.scoring import (
    accuracy,
    chrf,
    chrf_from_statistics,
    chrf_statistics,
    corpus_chrf,
    exact_match,
    label_match,
    normalize_answer,
    normalize_label,
    score_task,
    token_f1,
)


def test_label_normalization_and_first_word_rule():
    assert normalize_label("  Positive!! ") == "positive"
    assert label_match("Positive.", "positive")
    assert label_match("negative, clearly: it broke", "Negative")
    assert label_match("«Negative»", "negative")  # Unicode punctuation is dropped too
    assert not label_match("not positive", "positive")
    assert not label_match("positively", "positive")
    assert not label_match("", "positive")
    assert label_match("", "")
    assert not label_match("positive", "")


def test_accuracy_counts_hits_and_rejects_length_mismatch():
    preds = ["positive", "Negative.", "positive", "I think negative"]
    labels = ["positive", "negative", "negative", "negative"]
    assert accuracy(preds, labels) == 0.5
    assert accuracy([], []) == 0.0
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        accuracy(["a", "b"], ["a"])


def test_squad_normalization_exact_match_and_token_f1():
    assert normalize_answer("The  Eiffel-Tower, in PARIS.") == "eiffeltower in paris"
    assert exact_match("a teacher", "Teacher!") == 1.0
    assert exact_match("teachers", "teacher") == 0.0
    # pred "eiffel tower in paris" (4 tokens), ref "eiffel tower" (2): P = 2/4, R = 1, F1 = 2/3.
    assert token_f1("the Eiffel tower in Paris", "Eiffel Tower") == pytest.approx(2 / 3)
    # Clipped counts: pred "x x y", ref "x y y": common = min(2,1) + min(1,2) = 2, P = R = 2/3.
    assert token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert token_f1("red", "blue") == 0.0


def test_qa_empty_strings_follow_squad_v2():
    assert exact_match("", "") == 1.0
    assert token_f1("", "") == 1.0
    assert token_f1("the", "an") == 1.0  # both normalize to no tokens
    assert token_f1("", "Paris") == 0.0
    assert token_f1("Paris", "") == 0.0


def test_chrf_statistics_and_hand_computed_sentence_scores():
    # hyp "ab", ref "abc": n=1 (2 hyp, 3 ref, 2 match), n=2 (1, 2, 1), n=3 (0, 1, 0), n>3 empty.
    stats = chrf_statistics("ab", "abc")
    assert stats[:9] == [2, 3, 2, 1, 2, 1, 0, 1, 0] and stats[9:] == [0] * 9
    # Effective orders 1-2: P = (1 + 1)/2 = 1, R = (2/3 + 1/2)/2 = 7/12.
    # F_2 = 5 P R / (4 P + R) = (35/12) / (55/12) = 7/11.
    assert chrf("ab", "abc") == pytest.approx(100 * 7 / 11)
    # Swapped: P = 7/12, R = 1 -> F_2 = (35/12) / (40/12) = 7/8; recall weighs more (beta = 2).
    assert chrf("abc", "ab") == pytest.approx(87.5)
    assert chrf("ka domu", "kadomu") == 100.0  # whitespace is removed before n-grams
    # Case-sensitive, like sacrebleu's default: only "a" matches. n=1: P = R = 1/2; n=2: P = R = 0.
    assert chrf("Ka", "ka") == pytest.approx(25.0)
    # beta = 1 on the first pair: F_1 = 2 P R / (P + R) = (14/12) / (19/12) = 14/19.
    assert chrf("ab", "abc", beta=1.0) == pytest.approx(100 * 14 / 19)


def test_corpus_chrf_sums_statistics_instead_of_averaging_sentences():
    # Sums: n=1 (5, 5, 4), n=2 (3, 3, 2), n=3 (1, 1, 0): all three orders effective.
    # P = R = (4/5 + 2/3 + 0) / 3 = 22/45, so F = 22/45 whatever beta.
    got = corpus_chrf(["ab", "abc"], ["abc", "ab"])
    assert got == pytest.approx(100 * 22 / 45)
    mean_of_sentences = (chrf("ab", "abc") + chrf("abc", "ab")) / 2
    assert abs(got - mean_of_sentences) > 10


def test_chrf_edge_cases():
    assert chrf("", "") == 0.0  # no effective order, as in sacrebleu
    assert chrf("", "abc") == 0.0
    assert chrf("abc", "") == 0.0
    assert chrf("abcdefgh", "abcdefgh") == 100.0
    assert corpus_chrf([], []) == 0.0
    with pytest.raises(ValueError, match="triples"):
        chrf_from_statistics([1, 2])


def test_score_task_reports_points_per_task():
    assert score_task("sentiment", ["positive", "bad"], ["positive", "negative"]) == {
        "accuracy": 50.0
    }
    qa = score_task("qa", ["Paris", "the tower"], ["paris", "Eiffel tower"])
    assert qa["exact_match"] == 50.0
    assert qa["token_f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert score_task("rewrite", ["ab"], ["abc"]) == {"chrf": pytest.approx(100 * 7 / 11)}
    assert score_task("qa", [], []) == {"exact_match": 0.0, "token_f1": 0.0}
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        score_task("poetry", ["x"], ["y"])
