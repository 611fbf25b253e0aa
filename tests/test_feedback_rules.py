"""The scoring and pairing rules on hand-made rows: no engines, every branch."""

import json
import math

import pytest

from zephyr_ray.config import BinarizeConfig, Endpoint
from zephyr_ray.endpoint import EndpointKeyError, endpoint_key
from zephyr_ray.feedback.binarize import binarize_prompt, score_bin
from zephyr_ray.feedback.judge import (
    ASPECTS,
    RUBRIC_REGEX,
    completion_problem,
    endpoint_request,
    logprob_score,
    parse_rubric,
    reward_request,
    to_judgment,
)


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


def test_rubric_answers_that_are_not_json_keep_their_ratings_as_written():
    """What a chat endpoint without a schema writes: fenced JSON, a trailing comma, two objects. A rating of 8.5 is
    refused as in valid JSON (ratings are whole), never read as 8; two different overall ratings are refused."""
    aspects = '"instruction_following": 4, "honesty": 5, "truthfulness": 3, "helpfulness": 4, '
    scores, error = parse_rubric('```json\n{' + aspects + '"overall": 8,}\n```')
    assert error is None and scores["overall"] == 8.0 and scores["truthfulness"] == 3.0
    assert parse_rubric('```json\n{' + aspects + '"overall": 8.5,}\n```')[1] == parse_rubric(
        '{' + aspects + '"overall": 8.5}')[1] == "no valid `overall` rating (1-10) in the judge's answer"
    assert parse_rubric('{' + aspects + '"overall": 7} {"overall": 3}')[1] == \
        "several different `overall` ratings in the judge's answer"


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


COMPLETION = {"prompt": "Q?", "prompt_id": "id", "model": "m", "completion": "an answer",
              "messages": [{"role": "system", "content": "Be honest."}, {"role": "user", "content": "Q?"}],
              "generation_error": None}


def test_reward_model_reads_the_user_turns_and_the_completion_and_scores_the_raw_logit():
    request = reward_request(COMPLETION)
    assert request["messages"] == [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "an answer"}]
    assert request["pooling_params"] == {"use_activation": False}
    out = to_judgment({**request, "classifier_logits": [-1.25], "generation_error": None}, "reward_model", "rm")
    assert out["overall"] == -1.25 and out["judge_error"] is None and out["raw_judgment"] == "[-1.25]"
    out = to_judgment({**request, "classifier_logits": [0.1, 0.2], "generation_error": None}, "reward_model", "rm")
    assert out["overall"] is None and out["judge_error"] == "a reward model has one output; this one gave 2"
    out = to_judgment({**request, "classifier_logits": None, "generation_error": "prompt too long"},
                      "reward_model", "rm")
    assert out["judge_error"] == "judge failed: prompt too long"
    for overflowed in (math.nan, math.inf):  # no score (a NaN made binarize crash, or call a pair a tie)
        out = to_judgment({**request, "classifier_logits": [overflowed], "generation_error": None}, "reward_model",
                          "rm")
        assert out["overall"] is None and out["judge_error"].startswith("the reward model's score is not a number")


def test_the_same_text_is_never_its_own_rejected():
    """Two models (or samples) writing the same reply, scored differently by a judge that is not deterministic:
    not a preference. Another lower one is drawn; with none left, the prompt is a reject with the reason."""
    same = [judged("a", 9), {**judged("b", 5), "completion": "answer of a"}]
    pair, reject = binarize_prompt([*same, judged("c", 3)], BinarizeConfig(score="overall"))
    assert reject is None and pair["rejected_model"] == "c"
    pair, reject = binarize_prompt(same, BinarizeConfig(score="overall"))
    assert pair is None and reject["reason"] == "every lower-scored completion repeats the chosen text"


def test_endpoint_requests_carry_the_structured_output_the_endpoint_takes():
    sampling = {"temperature": 0.0, "top_p": 1.0, "max_tokens": 64, "seed": 3}
    schema = json.loads(endpoint_request(COMPLETION, sampling, "json_schema")["request"])
    assert schema["response_format"]["json_schema"]["schema"]["required"][:4] == list(ASPECTS)
    assert schema["seed"] == 3 and schema["max_tokens"] == 64
    regex = json.loads(endpoint_request(COMPLETION, sampling, "regex")["request"])
    assert regex["extra_body"] == {"structured_outputs": {"regex": RUBRIC_REGEX}} and "response_format" not in regex
    plain = endpoint_request(COMPLETION, sampling, "none")
    assert set(json.loads(plain["request"])) == {"temperature", "top_p", "max_tokens", "seed"}
    assert plain["messages"][1]["content"].endswith("Response:\nan answer")
    answer = ('{"instruction_following": 4, "honesty": 5, "truthfulness": 3, "helpfulness": 4, "overall": 8, '
              '"rationale": "fine"}')
    out = to_judgment({**plain, "generated_text": answer, "generation_error": None}, "openai", "gpt")
    assert out["overall"] == 8.0 and out["honesty"] == 5.0 and out["judge"] == "gpt"


def test_a_recipe_prompt_replaces_the_judges_and_is_named_in_its_label(tmp_path):
    """judge.prompt (text or a .txt file) and system_prompt reach the engine's and the endpoint's chats with the row's
    instruction and completion in them; the output format stays the kind's; the judge label names the prompt by a
    hash; a prompt without {response}, with stray braces, or given to a reward model is refused."""
    from pydantic import ValidationError

    from zephyr_ray.config import JudgeConfig
    from zephyr_ray.feedback.judge import RUBRIC_VERSION, judge_name, judge_requests

    (tmp_path / "short.txt").write_text("Rate {{as JSON}}: {instruction} => {response}")
    cfg = JudgeConfig(kind="rubric", engine={"model": "./judge"}, prompt=str(tmp_path / "short.txt"),
                      system_prompt="Be brief.")
    assert cfg.prompt == "Rate {{as JSON}}: {instruction} => {response}"
    sampling = cfg.sampling.model_dump()
    for messages in (judge_requests(COMPLETION, "rubric", sampling, cfg.prompt, cfg.system_prompt)["messages"],
                     endpoint_request(COMPLETION, sampling, "regex", cfg.prompt, cfg.system_prompt)["messages"]):
        assert messages == [{"role": "system", "content": "Be brief."},
                            {"role": "user", "content": "Rate {as JSON}: Q? => an answer"}]
    request = judge_requests(COMPLETION, "rubric", sampling, cfg.prompt, cfg.system_prompt)
    assert request["sampling_params"]["structured_outputs"] == {"regex": RUBRIC_REGEX}
    # "" = no system message (a judge whose template refuses one; the tiny judge learnt its prompt without one)
    assert judge_requests(COMPLETION, "rubric", sampling, cfg.prompt, "")["messages"] == [
        {"role": "user", "content": "Rate {as JSON}: Q? => an answer"}]
    label = judge_name(cfg)
    assert label.startswith("./judge (rubric, recipe prompt ") and RUBRIC_VERSION not in label
    assert judge_name(JudgeConfig(kind="rubric", engine={"model": "./judge"})) == f"./judge (rubric, {RUBRIC_VERSION})"
    for bad, reason in [("{instruction} only", "has no {response}"), ("{instruction} {response} {score}", "score"),
                        ("{instruction} {response} {", "braces")]:
        with pytest.raises(ValidationError, match=reason):
            JudgeConfig(kind="rubric", engine={"model": "./judge"}, prompt=bad)
    with pytest.raises(ValidationError, match="a reward model reads the chat itself"):
        JudgeConfig(kind="reward_model", engine={"model": "./rm"}, prompt="{instruction} {response}")


def test_endpoint_key_comes_from_the_environment_and_never_shows(monkeypatch):
    endpoint = Endpoint(base_url="http://127.0.0.1:9/v1", model="j", api_key_env="ZR_TEST_KEY")
    monkeypatch.delenv("ZR_TEST_KEY", raising=False)
    with pytest.raises(EndpointKeyError, match="environment variable ZR_TEST_KEY is not set"):
        endpoint_key(endpoint)
    monkeypatch.setenv("ZR_TEST_KEY", "sk-very-secret")
    key = endpoint_key(endpoint)
    assert key.get_secret_value() == "sk-very-secret" and "sk-very" not in repr(key) + str(key)
    assert endpoint_key(Endpoint(base_url="http://127.0.0.1:9/v1", model="j", api_key_env=None)) is None


@pytest.mark.parametrize("value, label", [(None, "unscored"), (7.0, "7"), (3.25, "3"), (3.75, "3.5"),
                                          (-0.2, "-0.5"), (4.49, "4")])
def test_scores_fall_in_half_point_histogram_bins(value, label):
    assert score_bin(value) == label


def test_pacer_spaces_request_starts_across_threads():
    """Five requests from four threads at 20 qps: the k-th starts no sooner than k x 50 ms after the first."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from zephyr_ray.endpoint import _Pacer

    pacer = _Pacer(qps=20.0)
    began = time.monotonic()

    def start(_: int) -> float:
        pacer.wait()
        return time.monotonic()

    with ThreadPoolExecutor(4) as pool:
        starts = sorted(pool.map(start, range(5)))
    assert all(started - began >= k * 0.05 - 0.002 for k, started in enumerate(starts))


def test_score_summary_counts_errors_and_averages_per_model(ray_local):
    import ray

    from zephyr_ray.feedback.judge import score_summary

    rows = [{"model": "a", "overall": 8.0, "judge_error": None}, {"model": "a", "overall": 6.0, "judge_error": None},
            {"model": "b", "overall": None, "judge_error": "no valid `overall`"},
            {"model": "b", "overall": 3.0, "judge_error": None}]
    assert score_summary(ray.data.from_items(rows)) == {"judge_errors": 1, "mean_overall": {"a": 7.0, "b": 3.0}}


def test_a_principle_goes_into_the_user_turn_for_a_template_that_refuses_system_messages(tiny_models):
    """principles_as auto: generator-1's template refuses a system message, so its principle opens the user turn;
    the row keeps the conversation with the principle as a system message, as every other pool model's row does,
    and the same principle (seeded per prompt and model) either way."""
    from zephyr_ray.config import PoolModel
    from zephyr_ray.feedback.complete import PRINCIPLES, completion_requests, principle_role

    refusing = PoolModel(name="generator-1", engine={"model": str(tiny_models["generator-1"])})
    plain = PoolModel(name="generator-1", engine={"model": str(tiny_models["generator-0"])})
    assert principle_role(refusing, "auto") == "user" and principle_role(plain, "auto") == "system"
    assert principle_role(refusing, "system") == "system" and principle_role(plain, "user") == "user"
    row = {"prompt": "Name a color.", "prompt_id": "p1"}
    as_user = completion_requests(row, refusing, use_principles=True, seed=0, principle_role="user")
    as_system = completion_requests(row, refusing, use_principles=True, seed=0)
    principle = PRINCIPLES[as_user["principle"]]
    assert as_user["messages"] == [{"role": "user", "content": f"{principle}\n\nName a color."}]
    assert as_system["messages"] == as_user["conversation"] == as_system["conversation"] == [
        {"role": "system", "content": principle}, {"role": "user", "content": "Name a color."}]
    without = completion_requests(row, refusing, use_principles=False, seed=0, principle_role="user")
    assert without["messages"] == without["conversation"] == [{"role": "user", "content": "Name a color."}]


def test_a_model_with_several_samples_answers_each_prompt_that_often_with_the_same_instruction_and_its_own_seeds():
    from zephyr_ray.config import CompleteConfig, Engine, PoolModel
    from zephyr_ray.feedback.complete import sampled_requests, to_completion

    policy = PoolModel(name="policy", engine=Engine(model="m"), samples=3)
    row = {"prompt": "What colour is the fema?", "prompt_id": "p1"}
    requests = sampled_requests(row, policy, use_principles=True, seed=7)
    assert [r["sample_name"] for r in requests] == policy.sample_names() == ["policy-1", "policy-2", "policy-3"]
    assert len({json.dumps(r["conversation"]) for r in requests}) == 1, "one principle and prompt for every sample"
    assert len({r["sampling_params"]["seed"] for r in requests}) == 3
    assert requests == sampled_requests(row, policy, use_principles=True, seed=7), "seeded: the same again"
    generated = {"generated_text": "It is red.", "num_input_tokens": 5, "num_generated_tokens": 4,
                 "finish_reason": "stop", "generation_error": None}
    assert to_completion({**requests[1], **generated}, "policy")["model"] == "policy-2"
    assert PoolModel(name="one", engine=Engine(model="m")).sample_names() == ["one"]
    CompleteConfig(models=[policy])  # one model with several samples is a pool to compare
    with pytest.raises(ValueError, match=r"would share a name: \['policy-2'\]"):  # rows of two models merged
        CompleteConfig(models=[policy, PoolModel(name="policy-2", engine=Engine(model="m"))])


def test_principles_are_drawn_as_ultrafeedback_draws_them_unless_the_recipe_says_otherwise():
    """UltraFeedback's mix for UltraChat/ShareGPT prompts by default (verbalized calibration ~2%, helpfulness ~60%);
    `uniform`: each principle as often, the draw of every earlier run (the tiny recipe's)."""
    import random
    from collections import Counter

    from zephyr_ray.config import CompleteConfig, Engine, PoolModel
    from zephyr_ray.feedback.complete import PRINCIPLES, completion_requests, stable_seed

    model = PoolModel(name="m", engine=Engine(model="m"))
    rows = [{"prompt": f"Question {i}?", "prompt_id": f"p{i}"} for i in range(4000)]
    def drawn(mix) -> Counter:
        return Counter(completion_requests(row, model, True, 0, mix=mix)["principle"] for row in rows)

    ultrafeedback, uniform = drawn(CompleteConfig().principle_mix), drawn("uniform")
    assert 0.55 < ultrafeedback["helpfulness"] / 4000 < 0.65 and ultrafeedback["verbalized_calibration"] / 4000 < 0.04
    assert all(0.2 < n / 4000 < 0.3 for n in uniform.values())
    old_draw = random.Random(stable_seed(0, "p7", "m")).choice(sorted(PRINCIPLES))
    assert completion_requests(rows[7], model, True, 0, mix="uniform")["principle"] == old_draw
    with pytest.raises(ValueError, match="unknown principles"):
        CompleteConfig(principle_mix={"kindness": 1.0})
    with pytest.raises(ValueError, match="at least 2 completions per prompt"):
        CompleteConfig(models=[PoolModel(name="one", engine=Engine(model="m"))])


def test_the_example_pairs_are_those_of_the_smallest_prompt_ids_whatever_the_file_order(tmp_path):
    """The demo and the report show the same pairs on every run, though Ray Data writes rows in no fixed order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from zephyr_ray.data import SUCCESS_MARKER
    from zephyr_ray.report import example_pairs

    out = tmp_path / "binarize" / "preferences"
    assert example_pairs(tmp_path) == []  # binarize has not run
    out.mkdir(parents=True)
    for name, ids in (("a.parquet", ["p7", "p2", "p9"]), ("b.parquet", ["p5", "p1"])):
        pq.write_table(pa.Table.from_pylist([{"prompt_id": i, "prompt": f"question {i}"} for i in ids]), out / name)
    assert example_pairs(tmp_path) == []  # not complete: no marker yet
    (out / SUCCESS_MARKER).write_text("5")
    assert [pair["prompt"] for pair in example_pairs(tmp_path)] == ["question p1", "question p2", "question p5"]
    assert [pair["prompt_id"] for pair in example_pairs(tmp_path, limit=1)] == ["p1"]
