"""Task metrics on hand-made cases whose scores are worked out by hand."""

from __future__ import annotations

import pytest

from inlaid.tasks import TASK_NAMES, get_task
from inlaid.tasks import metrics


def test_normalize_answer_drops_case_punctuation_articles():
    assert metrics.normalize_answer("  The Beatles!  ") == "beatles"
    assert metrics.normalize_answer("an Apple, a day") == "apple day"


def test_exact_match_over_aliases_uses_first_line():
    predictions = ["Meghan Trainor", "the answer is Paris", "Overland Park, Kansas\nmore text", ""]
    answers = [["Meghan Trainor"], ["Paris"], ["Overland Park, Kansas", "Kansas"], ["x"]]
    scores = metrics.exact_match(predictions, answers)
    assert scores["exact_match"] == pytest.approx(50.0)      # 1st and 3rd
    assert scores["contains_answer"] == pytest.approx(75.0)  # "paris" inside the 2nd too


def test_token_f1_by_hand():
    # "eight general education" vs "eight General Education categories": p=3/3, r=3/4 -> F1 6/7
    predictions = ["eight general education\nsecond line", "major", "nothing shared", ""]
    answers = [["eight General Education categories"], ["minor", "major"], ["abc"], ["x"]]
    scores = metrics.token_f1(predictions, answers)
    assert scores["f1"] == pytest.approx(100.0 * (6 / 7 + 1.0 + 0 + 0) / 4)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Answer: 17", 17.0),
        ("5 + 12 = 17, so the answer is 17.", 17.0),
        ("There were 1,250 people. Answer: 1,250", 1250.0),
        ("Answer: -3.5 degrees", -3.5),
        ("she had 4 then 9 apples", 9.0),
        ("Answer: 12 apples; earlier 3", 12.0),
        ("no number here", None),
    ],
)
def test_parse_number(text, expected):
    assert metrics.parse_number(text) == expected


def test_numeric_accuracy():
    scores = metrics.numeric_accuracy(["Answer: 17", "Answer: 16", "17.0", "x"], ["17", "17", "17", "17"])
    assert scores["accuracy"] == pytest.approx(50.0)


def test_label_accuracy_takes_the_first_label_named():
    labels = ("positive", "negative")
    predictions = ["Positive", "negative.", "It is positive, not negative", "neutral", "nonnegative"]
    references = ["positive", "positive", "positive", "negative", "negative"]
    scores = metrics.label_accuracy(predictions, references, labels)
    assert scores["accuracy"] == pytest.approx(40.0)  # 1st and 3rd
    assert scores["unparsed"] == pytest.approx(40.0)  # "neutral", "nonnegative" (not a whole word)


def test_rouge_l_matches_hand_computed_lcs():
    # reference: "the cat sat on the mat" (6 tokens), prediction: "the cat lay on a mat" (6)
    # LCS = the, cat, on, mat = 4 -> P = R = 4/6 -> F1 = 66.67; ROUGE-1: 4 unigrams shared
    scores = metrics.rouge(["the cat lay on a mat"], [["the cat sat on the mat"]])
    assert scores["rougeL"] == pytest.approx(100 * 4 / 6, abs=1e-6)
    assert scores["rouge1"] == pytest.approx(100 * 4 / 6, abs=1e-6)


def test_rouge_takes_the_best_reference():
    scores = metrics.rouge(["blue spice is a pub"], [["nothing alike here", "blue spice is a pub"]])
    assert scores["rougeL"] == pytest.approx(100.0)


def test_bleu_perfect_and_disjoint():
    perfect = metrics.bleu(["Car Dieu a tant aimé le monde qu'il a donné son Fils"],
                           ["Car Dieu a tant aimé le monde qu'il a donné son Fils"])
    assert perfect["bleu"] == pytest.approx(100.0)
    disjoint = metrics.bleu(["xyz qqq www"], ["Car Dieu a tant aimé le monde"])
    assert disjoint["bleu"] == pytest.approx(0.0)


def test_bleu_scores_only_the_first_line():
    reference = "Au commencement Dieu créa les cieux et la terre."
    assert metrics.bleu([reference + "\nAu commencement Dieu créa"], [reference])["bleu"] == pytest.approx(100.0)


def test_strip_code_fence():
    assert metrics.strip_code_fence("Here:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1"
    assert metrics.strip_code_fence("def f():\n    return 1") == "def f():\n    return 1"


def test_every_task_metric_has_its_primary_key_and_perfect_score():
    for name in TASK_NAMES:
        task = get_task(name)
        examples = task.load_split("eval")[:8]
        scores = task.metric([e["reference"] for e in examples], examples)
        assert task.primary_metric in scores
        assert scores[task.primary_metric] == pytest.approx(100.0), name
        assert 1 <= task.max_new_tokens <= 256


def test_token_f1_of_answers_that_normalise_to_nothing_follows_squad():
    """An empty prediction for an answer of articles alone ("The") is an exact match (both
    normalise to nothing) and scored F1 0; SQuAD's F1 is 1 there (an outside probe)."""
    assert metrics.exact_match([""], [["The"]])["exact_match"] == 100.0
    assert metrics.token_f1([""], [["The"]])["f1"] == 100.0
    assert metrics.token_f1([""], [[""]])["f1"] == 100.0
    assert metrics.token_f1(["an answer"], [["the"]])["f1"] == 0.0  # one side empty alone: 0
    assert metrics.token_f1([""], [["Paris"]])["f1"] == 0.0


def test_bleu_of_no_examples_is_zero_as_the_other_metrics_say():
    """sacreBLEU raised IndexError on an empty corpus (`get_task("trans-fr").metric([], [])`)."""
    assert metrics.bleu([], []) == {"bleu": 0.0, "chrf": 0.0}
    assert metrics.exact_match([], [])["exact_match"] == 0.0
