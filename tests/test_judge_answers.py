"""Any judge answer becomes a row (Hypothesis). Whatever text a judge returns (lone surrogates, NUL, ratings of 5000
digits, JSON nested 100,000 deep, null or empty content, numbers as strings) and whatever an endpoint does (HTTP 500
after the retries, a body that is not JSON or nested too deep), the judge's parsers give a score or a reason, never an
exception; and the real judge stage, pointed at a local OpenAI-compatible stub server that answers so, completes on
Ray Data with exactly one judgment row per completion: the well-formed answers scored, each other one a
`judge_error` saying why, and text Arrow cannot hold repaired (U+FFFD) and counted, never a crashed write."""

import json
import random
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import record_reliability
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from zephyr_ray.config import Recipe
from zephyr_ray.data import SUCCESS_MARKER, CompletionRow, text_repairs
from zephyr_ray.evaluate.prompts import parse_rating, parse_verdict
from zephyr_ray.feedback.judge import ASPECTS, parse_rubric
from zephyr_ray.untrusted import MAX_DIGITS, clean_text, clean_value, rating, read_json

REPO = Path(__file__).resolve().parents[1]
PROPERTY = settings(max_examples=400, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example])

# ---------------------------------------------------------------------------------------------------------------
# Hostile answers
# ---------------------------------------------------------------------------------------------------------------

# any code point, lone surrogates and control characters (NUL) included: Hypothesis' default text leaves out surrogates
any_text = st.text(st.one_of(st.characters(exclude_categories=()), st.characters(categories=["Cs", "Cc"])),
                   max_size=60)
huge_number = st.integers(4_000, 6_000).map(lambda n: "9" * n)  # digits: Python's int() refuses over 4300
rating_value = st.one_of(st.integers(), st.integers(0, 11), st.floats(), st.booleans(), st.none(), any_text,
                         st.integers(0, 11).map(str), st.just(1e999))
HUGE = "HUGE-NUMBER"  # in a rubric object: replaced by 5000 digits in its JSON text
rubric_object = st.fixed_dictionaries({key: st.one_of(rating_value, st.just(HUGE)) for key in (*ASPECTS, "overall")},
                                      optional={"rationale": any_text})


def rubric_text(data: dict, cut: int | None) -> str:
    text = json.dumps(data).replace(f'"{HUGE}"', "9" * 5000)
    return text if cut is None else text[:cut]


# the answers the issue names, and what a judge (or something in front of it) may write
NAMED = {
    "lone surrogate": "\ud800",
    "lone surrogate in the rationale": json.dumps(
        {**dict.fromkeys(ASPECTS, 4), "overall": 7, "rationale": "fine \udc00 really"}),
    "NUL": "\x00",
    "NUL in the rationale": json.dumps({**dict.fromkeys(ASPECTS, 3), "overall": 6, "rationale": "a\x00b"}),
    "5000-digit rating": '{"instruction_following": 4, "honesty": 4, "truthfulness": 4, "helpfulness": 4, '
                         '"overall": ' + "9" * 5000 + ', "rationale": "x"}',
    "5000-digit rating, cut short": '{"instruction_following": ' + "4" * 5000,
    "JSON nested 100,000 deep": "[" * 100_000 + "]" * 100_000,
    "objects nested 100,000 deep": '{"a": ' * 100_000 + "1" + "}" * 100_000,
    "empty": "",
    "blank": " \n\t",
    "null as JSON": "null",
    "a bare number": "7",
    "numbers as strings": json.dumps({**dict.fromkeys(ASPECTS, "5"), "overall": " 9 ", "rationale": "quoted"}),
    "a fraction": json.dumps({**dict.fromkeys(ASPECTS, 4), "overall": 7.5, "rationale": "half"}),
    "NaN": '{"instruction_following": NaN, "honesty": 1, "truthfulness": 1, "helpfulness": 1, "overall": 1}',
    "a boolean": json.dumps({**dict.fromkeys(ASPECTS, True), "overall": 1}),
    "out of range": json.dumps({**dict.fromkeys(ASPECTS, 6), "overall": 11}),
    "a list": "[4, 4, 4, 4, 8]",
    "prose": "I would rate this response highly. Overall: 9/10.",
    "truncated well-formed": '{"instruction_following": 5, "honesty": 4, "truthfulness": 4, "helpfulness": 5, '
                             '"overall": 9, "rationale": "cut he',
}
WELL_FORMED = [json.dumps({**dict(zip(ASPECTS, (1 + i % 5, 2, 3, 4), strict=True)), "overall": 1 + i % 10,
                           "rationale": f"well-formed answer {i}"}) for i in range(6)]

hostile_answer = st.one_of(
    any_text,
    st.sampled_from(sorted(NAMED.values())),
    st.builds(rubric_text, rubric_object, st.one_of(st.none(), st.integers(0, 120))),
    st.integers(1, 100_000).map(lambda n: "[" * n),
    st.integers(1, 50_000).map(lambda n: '{"overall": ' * n),
    huge_number.map(lambda digits: f'{{"rating": {digits}, "overall": {digits}}}'),
    huge_number.map(lambda digits: f"Rating: [[{digits}]] [[A]]"),
    st.builds(lambda a, b: f"{a}[[{b}]]{a}", any_text, st.one_of(st.integers(0, 12).map(str), any_text)),
)


# ---------------------------------------------------------------------------------------------------------------
# (a) The parsers: any text gives a result or a reason, never an exception
# ---------------------------------------------------------------------------------------------------------------


@PROPERTY
@given(text=st.one_of(any_text, hostile_answer))
def test_any_answer_is_a_rubric_score_or_a_reason(text):
    scores, error = parse_rubric(text)
    assert (error is None) != (not scores), (scores, error)
    if error is None:
        assert all(scores[a] in (1.0, 2.0, 3.0, 4.0, 5.0) for a in ASPECTS)
        assert scores["overall"] in {float(n) for n in range(1, 11)}
    else:
        assert isinstance(error, str) and error and error.isascii() and len(error) < 200


@PROPERTY
@given(text=st.one_of(any_text, hostile_answer))
def test_any_answer_is_a_rating_and_a_verdict_or_a_reason(text):
    value, error = parse_rating(text)
    assert (value is None) != (error is None)
    assert value is None or 1 <= value <= 10
    assert error is None or (error.isascii() and len(error) < 200)
    verdict, error = parse_verdict(text)
    assert (verdict is None) != (error is None)
    assert verdict in (None, "first", "second", "tie")


@PROPERTY
@given(value=st.one_of(rating_value, st.integers(4_000, 6_000).map(lambda n: 10**n), st.lists(rating_value, max_size=3),
                       hostile_answer))
def test_a_rating_is_a_bounded_finite_number_or_none(value):
    number = rating(value)
    assert number is None or (isinstance(number, float) and abs(number) < 10**MAX_DIGITS)
    assert rating(value, whole=True) in (None, number)


@pytest.mark.parametrize(("value", "expected"), [
    (7, 7.0), (7.0, 7.0), ("7", 7.0), (" 8.5 ", 8.5), ("07", 7.0), (True, None), ("7/10", None), ("-3", None),
    ("\u0663", None), ("9" * (MAX_DIGITS + 1), None), (10**5000, None), (float("nan"), None), (1e999, None),
    (None, None), ([7], None),
], ids=lambda v: "10**5000" if isinstance(v, int) and v > 10**100 else ascii(v)[:24])
def test_ratings_as_written(value, expected):
    """A number written as a string counts when it is a plain decimal number (a quoting judge or proxy); other
    digits than ASCII, signs and fractions of a rating are not ratings."""
    assert rating(value) == expected


def test_the_named_hostile_answers_give_readable_reasons():
    reasons = {name: parse_rubric(text)[1] for name, text in NAMED.items()}
    assert reasons["lone surrogate in the rationale"] is None and reasons["NUL in the rationale"] is None
    assert reasons["numbers as strings"] is None and parse_rubric(NAMED["numbers as strings"])[0]["overall"] == 9.0
    assert reasons["truncated well-formed"] is None
    assert reasons["empty"] == reasons["blank"] == "the judge's answer is empty"
    assert reasons["null as JSON"] == "judge answered null, not a JSON object"
    assert reasons["a bare number"] == "judge answered number, not a JSON object"
    assert reasons["5000-digit rating"] == "no valid `overall` rating (1-10) in the judge's answer"
    assert reasons["a fraction"] == "no valid `overall` rating (1-10) in the judge's answer"
    for name in ("lone surrogate", "NUL", "JSON nested 100,000 deep", "objects nested 100,000 deep", "NaN",
                 "a boolean", "out of range", "prose", "5000-digit rating, cut short"):
        assert reasons[name].startswith(("no valid `", "judge answered")), (name, reasons[name])
    assert parse_rating('{"rating": "6"}') == (6.0, None)  # evaluate reads the same numbers through the same reader
    assert read_json("[" * 100_000) is read_json("\ud800") is read_json(None)


@PROPERTY
@given(text=any_text)
def test_cleaned_text_is_valid_utf8_and_valid_text_is_untouched(text):
    cleaned, repaired = clean_text(text)
    cleaned.encode("utf-8")
    assert repaired == sum("\ud800" <= c <= "\udfff" for c in text)
    assert (cleaned == text) == (repaired == 0)
    assert cleaned.count("\x00") == text.count("\x00")  # NUL is valid UTF-8: kept
    nested, count = clean_value({"messages": [{"content": text}], "k" + text: [text, 1, None]})
    assert count == 3 * repaired and json.dumps(nested, ensure_ascii=False).encode("utf-8")


# ---------------------------------------------------------------------------------------------------------------
# (b) The judge stage against a stub endpoint that answers with all of it, in one Ray Data pass
# ---------------------------------------------------------------------------------------------------------------


def chat_body(content, **changes) -> bytes:
    body = {"id": "stub", "object": "chat.completion", "created": 0, "model": "stub-judge",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
    body.update(changes)
    return json.dumps(body).encode()  # ensure_ascii: a lone surrogate travels as "\ud800", as a real server sends it


# what the endpoint does, beyond the answer's text: (status, body, expected judge_error fragment)
ENDPOINT_CASES = {
    "HTTP 500 every time": (500, b'{"error": {"message": "the judge fell over"}}', "judge failed: HTTP 500"),
    "a body that is not JSON": (200, b"<html>upstream proxy error</html>", "judge failed: unreadable answer from"),
    "a body nested 100,000 deep": (200, b"[" * 100_000, "judge failed: unreadable answer from"),
    "a body with a 5000-digit token count": (
        200, chat_body("{}").replace(b'"prompt_tokens": 10', b'"prompt_tokens": ' + b"1" * 5000),
        "judge failed: unreadable answer from"),
    "null content": (200, chat_body(None), "judge failed: the endpoint returned no message content"),
    "content that is a number": (200, chat_body(7), "judge failed: the endpoint's message content is int, not text"),
    "no choices": (200, chat_body("x", choices=[]), "judge failed: the endpoint returned no message content"),
    "a choice that is a string": (200, chat_body("x", choices=["x"]),
                                  "judge failed: the endpoint returned no message content"),
    "a token count beyond int64": (200, chat_body(WELL_FORMED[0], usage={"prompt_tokens": 10**30}), None),
}


class StubJudge:
    """An OpenAI-compatible chat endpoint on 127.0.0.1 that answers each request by the case named in the judged
    completion (``[case N]``): a text as the message content, or a whole response (status and body)."""

    def __init__(self, replies: dict[int, tuple[int, bytes]]) -> None:
        self.replies = replies
        self.requests: Counter = Counter()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = request["messages"][-1]["content"]
                case = int(re.search(r"\[case (\d+)\]", prompt).group(1))
                stub.requests[case] += 1
                status, body = stub.replies[case]
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def drawn_answers(n: int) -> list[str]:
    """``n`` hostile answers drawn by Hypothesis (fixed seed: the same ones every run), for one stage run."""
    drawn: list[str] = []

    @settings(max_examples=n, database=None, derandomize=True, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(hostile_answer)
    def draw(answer):
        drawn.append(answer)

    draw()
    unique = list(dict.fromkeys(drawn))
    random.Random(0).shuffle(unique)
    return unique[:n]


def completion(case: int, model: str, text: str | None = None, error: str | None = None) -> dict:
    prompt = f"Question {case}: say something."
    return {"prompt": prompt, "prompt_id": f"p{case}", "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "completion": f"Answer to [case {case}]." if text is None else text,
            "sampling_params": "{}", "principle": None, "num_prompt_tokens": 5, "num_generated_tokens": 5,
            "finish_reason": "error" if error else "stop", "generation_error": error}


def write_output(rows: list[dict], out: Path) -> None:
    """A finished ``complete/models/<model>`` output, as the complete stage leaves it."""
    out.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=CompletionRow.arrow_schema()), out / "part-0.parquet")
    (out / SUCCESS_MARKER).write_text(json.dumps({"rows": len(rows)}) + "\n")


def stub_recipe(url: str) -> Recipe:
    data = yaml.safe_load((REPO / "jobs" / "configs" / "tiny-cpu.yaml").read_text())
    data["complete"]["models"] = data["complete"]["models"][:2]
    data["judge"] = {"kind": "openai", "sampling": {"temperature": 0.0, "max_tokens": 128},
                     "endpoint": {"base_url": url, "model": "stub-judge", "api_key_env": None, "qps": 1000,
                                  "max_retries": 1, "timeout_s": 20, "max_in_flight": 8,
                                  "structured_output": "json_schema"}}
    return Recipe.model_validate(data)


CASE = ("a judge endpoint (stub OpenAI server) answering with any text: lone surrogates, NUL, 5000-digit ratings, "
        "JSON nested 100,000 deep, null, empty, numbers as strings, bodies that are not JSON, HTTP 500 after the retries")


@pytest.mark.reliability(  # the case as a literal: scripts/reliability_table.py reads it from the source
    "hostile input",
    "a judge endpoint (stub OpenAI server) answering with any text: lone surrogates, NUL, 5000-digit ratings, "
    "JSON nested 100,000 deep, null, empty, numbers as strings, bodies that are not JSON, HTTP 500 after the retries")
def test_the_judge_stage_makes_one_row_of_any_answer_from_a_stub_endpoint(ray_local, tmp_path):
    from zephyr_ray.stages import run_stage

    answers = [*NAMED.values(), *WELL_FORMED, *drawn_answers(30)]
    replies = {i: (200, chat_body(text)) for i, text in enumerate(answers)}
    expected = {i: parse_rubric(json.loads(json.dumps(text))) for i, text in enumerate(answers)}  # as received
    first_endpoint_case = len(answers)
    for i, (status, body, _) in enumerate(ENDPOINT_CASES.values(), start=first_endpoint_case):
        replies[i] = (status, body)
    recipe = stub_recipe("http://unused")
    models = [m.name for m in recipe.complete.models]
    rows = {m: [] for m in models}
    for i in replies:
        rows[models[i % 2]].append(completion(i, models[i % 2]))
    unjudgeable = [completion(9001, models[0], text=" ", error=None),
                   completion(9002, models[1], text="", error="engine died")]
    rows[models[0]].append(unjudgeable[0])
    rows[models[1]].append(unjudgeable[1])
    run_dir = tmp_path / "run"
    for model in models:
        write_output(rows[model], run_dir / "complete" / "models" / model)
    total = sum(len(r) for r in rows.values())

    with StubJudge(replies) as stub:
        started = time.perf_counter()
        result = run_stage("judge", stub_recipe(stub.url), run_dir)
        seconds = time.perf_counter() - started

    out = run_dir / "judge" / "judgments"
    judgments = pq.read_table(out).to_pylist()
    cases = Counter(int(found.group(1)) if (found := re.search(r"\[case (\d+)\]", j["completion"])) else None
                    for j in judgments)
    # exactly one judgment row per completion, the unjudgeable ones included
    assert len(judgments) == total == result.counts["judgments"]
    assert cases == Counter([*replies, None, None])
    case_of = {j["completion"]: j for j in judgments}
    for i, text in enumerate(answers):
        row = case_of[f"Answer to [case {i}]."]
        scores, error = expected[i]
        assert row["judge_error"] == error, (i, text[:80], row["judge_error"])
        received = json.loads(json.dumps(text))
        assert row["raw_judgment"] == clean_text(received)[0]  # the answer kept, valid UTF-8
        if error is None:
            assert {a: row[a] for a in (*ASPECTS, "overall")} == {a: scores[a] for a in (*ASPECTS, "overall")}
            assert row["rationale"] == (None if scores["rationale"] is None else clean_text(scores["rationale"])[0])
        else:
            assert all(row[a] is None for a in (*ASPECTS, "overall"))
    for i, (name, (_, _, fragment)) in enumerate(ENDPOINT_CASES.items(), start=first_endpoint_case):
        row = case_of[f"Answer to [case {i}]."]
        if fragment is None:
            assert row["judge_error"] is None and row["overall"] is not None, (name, row["judge_error"])
        else:
            assert row["judge_error"] and row["judge_error"].startswith(fragment), (name, row["judge_error"])
            assert len(row["judge_error"]) < 700 and row["overall"] is None
    assert stub.requests[first_endpoint_case] == 2, "HTTP 500: the request and its one retry"
    assert case_of[" "]["judge_error"] == "not judged: completion is empty"
    assert case_of[""]["judge_error"] == "not judged: generation failed: engine died"
    assert all(case_of[f"Answer to [case {answers.index(text)}]."]["overall"] is not None for text in WELL_FORMED)

    # text that was not valid UTF-8 (lone surrogates in an answer, or in the rationale its JSON holds) was repaired
    # and counted
    should_repair = {i for i, text in enumerate(answers)
                     if clean_value([json.loads(json.dumps(text)), expected[i][0].get("rationale")])[1]}
    assert {"lone surrogate", "lone surrogate in the rationale"} <= {
        name for name, text in NAMED.items() if answers.index(text) in should_repair}
    assert text_repairs(out)["rows"] == len(should_repair)
    assert result.counts["text_repaired"] == {"judge/judgments": len(should_repair)}
    assert result.counts["judge_errors"] == sum(j["judge_error"] is not None for j in judgments)
    scored = sum(j["judge_error"] is None for j in judgments)
    record_reliability("hostile input", CASE, f"the judge stage completed in {seconds:.0f} s: {total} completions, "
                       f"{total} judgment rows ({scored} scored, {total - scored} with a judge_error saying why); "
                       f"{len(should_repair)} rows' text repaired (U+FFFD) and counted", "nothing: every completion "
                       "has exactly one judgment row")
