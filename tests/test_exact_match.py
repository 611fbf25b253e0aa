"""Exact-match scoring rules: GSM8K rows read unchanged, the stated extraction rules, accuracy and paired intervals."""

import pytest

from zephyr_ray.evaluate.exact_match import (
    accuracy,
    check_pattern,
    extract_answer,
    paired_difference,
    reference_answer,
    same_answer,
    score,
)

# GSM8K's first training row, as its JSONL holds it (worked solution with calculator marks, then "#### 72")
GSM8K_ROW = {
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips to her friends "
                "in May. How many clips did Natalia sell altogether in April and May?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether "
              "in April and May.\n#### 72",
}


def test_the_reference_is_gsm8ks_final_answer_or_a_plain_value():
    assert reference_answer(GSM8K_ROW["answer"]) == "72"
    assert reference_answer(" Paris ") == "Paris"
    assert reference_answer("The total is 1,234\n#### 1,234") == "1,234"


@pytest.mark.parametrize(("reply", "rule", "expected"), [
    ("She sold 24 in May, 72 in all.\n#### 72", "gsm8k", "72"),
    ("#### 5 then more text\n#### $1,200.", "gsm8k", "$1,200"),   # the last marker
    ("The answer is 72.", "gsm8k", None),                          # no marker: unparsed under this rule
    ("24 in May, so 72 altogether.", "last_number", "72"),
    ("-3 degrees, then 4.5", "last_number", "4.5"),
    ("no digits here", "last_number", None),
    ("Answer: blue. Final answer: Red", r"(?i)final answer:\s*(\w+)", "Red"),
    ("Answer: blue.", r"Answer: \w+", "Answer: blue"),
    (None, "last_number", None),
    ("#### .5", "gsm8k", ".5"),                                    # a leading point is part of the number
    ("#### \u22127", "gsm8k", "\u22127"),                            # the Unicode minus is a sign
    ("In 2023-2024 it grew by 8", "last_number", "8"),
    ("The seasons 2023-2024", "last_number", "2024"),              # a hyphen between numbers is no sign
])
def test_each_rule_takes_the_final_answer_out_of_a_reply(reply, rule, expected):
    assert extract_answer(reply, rule) == expected


def test_numbers_compare_as_numbers_and_text_as_folded_text():
    assert same_answer("$1,234", "1234") and same_answer("72.0", "72") and same_answer("72.", "72")
    assert not same_answer("71", "72") and same_answer(" paris", "Paris") and not same_answer("Lyon", "Paris")
    # exactly: no tolerance that makes a large neighbour equal; the Unicode minus reads as one
    assert not same_answer("10000001", "10000000") and same_answer("3.50", "3.5") and same_answer("\u22127", "-7")
    assert not same_answer(".5", "5") and same_answer(".5", "0.5")


def test_a_pattern_is_a_rule_or_a_regex_that_compiles():
    assert check_pattern("gsm8k") == "gsm8k" and check_pattern(r"(\d+)") == r"(\d+)"
    with pytest.raises(ValueError, match="nor a regular expression"):
        check_pattern("(unclosed")


def test_accuracy_counts_unparsed_replies_as_wrong_and_the_paired_interval_uses_the_same_questions():
    replies = [{"question_id": i, "reference": f"x\n#### {i}", "reply": f"so #### {i}"} for i in range(8)]
    replies += [{"question_id": 8, "reference": "#### 8", "reply": "I do not know"},
                {"question_id": 9, "reference": "#### 9", "reply": "#### 10"}]
    good = score(replies, "gsm8k")
    result = accuracy(good, samples=500)
    assert (result["accuracy"], result["n"], result["unparsed"]) == (0.8, 10, 1)
    low, high = result["interval"]
    assert low <= 0.8 <= high and 0.0 <= low < high <= 1.0
    bad = score([{**r, "reply": "#### 0"} for r in replies], "gsm8k")
    assert accuracy(bad, samples=500)["accuracy"] == 0.1  # question 0's answer is 0
    diff = paired_difference(good, bad, samples=500)
    assert diff["n"] == 10 and diff["difference"] == pytest.approx(0.7) and diff["interval"][0] > 0
    assert accuracy([], samples=10) == {"accuracy": None, "interval": None, "n": 0, "unparsed": 0}
