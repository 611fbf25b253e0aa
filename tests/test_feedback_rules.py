"""The scoring and pairing rules on hand-made rows: no engines, every branch."""

import math

import pytest

from zephyr_ray.config import BinarizeConfig
from zephyr_ray.feedback.binarize import binarize_prompt
from zephyr_ray.feedback.judge import ASPECTS, RUBRIC_REGEX, completion_problem, logprob_score, parse_rubric


def judged(model: str, overall: float | None, aspects: float | None = None, error: str | None = None) -> dict:
    return {"prompt": "Q?", "prompt_id": "id", "model": model, "completion": f"answer of {model}",
            "judge": "j", "overall": overall, "judge_error": error,
            **{a: aspects for a in ASPECTS}}


def test_chosen_is_best_and_rejected_strictly_lower():
    rows = [judged("a", 9), judged("b", 3), judged("c", 5), judged("d", 9)]
    for seed in range(20):
        pair, reject = binarize_prompt(rows, BinarizeConfig(score="overall", seed=seed))
        assert reject is None
        assert pair["chosen_model"] in ("a", "d") and pair["rejected_model"] in ("b", "c")
        assert pair["score_chosen"] == 9 and pair["score_chosen"] > pair["score_rejected"]


def test_draws_are_seeded_and_order_free():
    rows = [judged("a", 9), judged("b", 3), judged("c", 5), judged("d", 4)]
    cfg = BinarizeConfig(score="overall", seed=7)
    first, _ = binarize_prompt(rows, cfg)
    again, _ = binarize_prompt(list(reversed(rows)), cfg)
    assert first == again
    assert {binarize_prompt(rows, BinarizeConfig(score="overall", seed=s))[0]["rejected_model"]
            for s in range(30)} == {"b", "c", "d"}


def test_lowest_option_and_mean_of_aspects():
    rows = [judged("a", 1, aspects=5), judged("b", 10, aspects=2), judged("c", 5, aspects=3)]
    pair, _ = binarize_prompt(rows, BinarizeConfig(score="mean_aspects", rejected="lowest"))
    assert (pair["chosen_model"], pair["rejected_model"]) == ("a", "b")
    assert (pair["score_chosen"], pair["score_rejected"]) == (5.0, 2.0)


@pytest.mark.parametrize("rows, reason", [
    ([judged("a", 7), judged("b", 7), judged("c", 7)], "all scored completions tie"),
    ([judged("a", 7), judged("b", None, error="no valid `overall`")], "fewer than 2 scored completions"),
])
def test_prompts_without_a_preference_are_rejected_with_the_reason(rows, reason):
    pair, reject = binarize_prompt(rows, BinarizeConfig(score="overall"))
    assert pair is None and reject["reason"] == reason and reject["num_completions"] == len(rows)


def test_rubric_answers_parse_even_when_cut_short():
    full = ('{"instruction_following": 4, "honesty": 5, "truthfulness": 3, "helpfulness": 4, "overall": 8, '
            '"rationale": "fine"}')
    import re

    assert re.fullmatch(RUBRIC_REGEX, full)
    scores, error = parse_rubric(full)
    assert error is None and scores["overall"] == 8.0 and scores["rationale"] == "fine"
    scores, error = parse_rubric(full[:-12])  # truncated inside the rationale
    assert error is None and scores["honesty"] == 5.0
    assert parse_rubric('{"instruction_following": 4, "honesty": 5')[1] == \
        "no valid `truthfulness` rating (1-5) in the judge's answer"
    assert parse_rubric("[1, 2]")[1] == "judge answered list, not a JSON object"


def test_logprob_score_is_the_probability_weighted_mean():
    top = [{1: {"decoded_token": "2", "logprob": math.log(0.6)}, 2: {"decoded_token": "4", "logprob": math.log(0.2)},
            3: {"decoded_token": "x", "logprob": math.log(0.2)}}]
    score, error = logprob_score(top)
    assert error is None and score == pytest.approx((2 * 0.6 + 4 * 0.2) / 0.8)
    assert logprob_score([{1: {"decoded_token": "x", "logprob": 0.0}}])[1] == \
        "no rating token among the judge's top log-probabilities"
    assert logprob_score(None)[1] == "no log-probabilities returned"


def test_completions_that_cannot_be_judged_say_why():
    assert completion_problem({"generation_error": None, "completion": "ok"}) is None
    assert completion_problem({"generation_error": None, "completion": "  "}) == "completion is empty"
    assert completion_problem({"generation_error": None, "completion": "a\x00"}) == \
        "completion contains a NUL character"
    assert completion_problem({"generation_error": "engine died", "completion": ""}) == \
        "generation failed: engine died"
