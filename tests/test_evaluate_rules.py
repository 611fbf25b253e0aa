"""The evaluation's rules without engines: question formats, judge prompts and parsing, win-rate statistics,
decontamination's n-gram screen, and the config checks."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from zephyr_ray.config import RecipeError, load_recipe
from zephyr_ray.data import InstructionRow, QuestionRow, ReferenceAnswerRow, check_row
from zephyr_ray.decontaminate import Screen
from zephyr_ray.evaluate.grading import grading_results, to_judgment
from zephyr_ray.evaluate.pairwise import length_controlled, pairwise_results
from zephyr_ray.evaluate.prompts import explanation_chars, grade_prompt, output_regex, parse_rating, parse_verdict
from zephyr_ray.statistics import bootstrap_interval

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "jobs" / "data" / "tiny_mt_bench.jsonl"
FASTCHAT = REPO / "tests" / "data" / "fastchat"  # FastChat's own MT-Bench files, unchanged (see its NOTICE.md)


def test_the_shipped_question_set_is_mt_bench_format_with_references_where_mt_bench_has_them():
    rows = [json.loads(line) for line in SHIPPED.read_text().splitlines()]
    accepted = [check_row(json.dumps(row), None, QuestionRow)[0] for row in rows]
    assert all(accepted) and len(accepted) == 16
    assert {q["category"] for q in accepted} == {"writing", "roleplay", "reasoning", "math", "coding", "extraction",
                                                 "stem", "humanities"}
    assert all(len(q["turns"]) == 2 for q in accepted)
    assert {q["category"] for q in accepted if q["reference"]} == {"math", "reasoning", "coding"}


def test_question_rows_read_fastchat_and_the_hub_copy_alike():
    fastchat = {"question_id": 81, "category": "writing", "turns": ["a", "b"]}
    hub = {"prompt_id": 81, "category": "writing", "prompt": ["a", "b"], "reference": []}
    assert check_row(json.dumps(fastchat), None, QuestionRow)[0] == check_row(json.dumps(hub), None, QuestionRow)[0] \
        == {"question_id": "81", "category": "writing", "turns": ["a", "b"], "reference": None}
    _, reject = check_row(json.dumps({"question_id": 1, "category": "math", "turns": []}), None, QuestionRow)
    assert reject == {"field": "turns", "reason": "turns is empty"}
    _, reject = check_row(json.dumps({"question_id": 1, "category": "math", "turns": ["ok", " "]}), None, QuestionRow)
    assert reject["field"] == "turns" and "turns[1] is empty" in reject["reason"]
    _, reject = check_row(json.dumps({"category": "math", "turns": ["ok"]}), None, QuestionRow)
    assert reject == {"field": "question_id", "reason": "missing field"}
    answer = {"question_id": 81, "model_id": "gpt-4", "choices": [{"index": 0, "turns": ["r1", "r2"]}]}
    assert check_row(json.dumps(answer), None, ReferenceAnswerRow)[0] == {"question_id": "81", "turns": ["r1", "r2"]}
    alpaca = {"instruction": "Say hi", "output": "Hi!", "generator": "gpt4_turbo", "dataset": "helpful_base"}
    row = check_row(json.dumps(alpaca), None, InstructionRow)[0]
    assert row["instruction"] == "Say hi" and len(row["instruction_id"]) == 64 and row["generator"] == "gpt4_turbo"


def test_turn_two_is_judged_with_turn_one_and_the_references_of_both_turns():
    question = {"turns": ["What is 2+3?", "Times 4?"], "reference": ["5", "20"]}
    prompt = grade_prompt(question, ["It is 5.", "It is 20."], turn=2, use_reference=True)
    assert prompt.index("What is 2+3?") < prompt.index("It is 5.") < prompt.index("Times 4?") < prompt.index("It is 20.")
    assert "[Reference answer, turn 1]\n5" in prompt and "[Reference answer, turn 2]\n20" in prompt
    assert "Rating: [[5]]" in prompt
    plain = grade_prompt(question, ["It is 5."], turn=1, use_reference=False)
    assert "Reference" not in plain and "It is 5." in plain


@pytest.mark.parametrize(("text", "rating", "error"), [
    ("Good answer.\n\nRating: [[8]]", 8.0, None),
    ("Rating: [[8.5]]", 8.5, None),
    ("Rating: [7]", 7.0, None),  # FastChat's single-bracket fallback
    ('{"explanation": "fine", "rating": 6}', 6.0, None),
    ("Rating: [[8]] ... no wait, [[8]]", 8.0, None),
    ("I like it.", None, "no [[rating]] in the judge's answer"),
    ("[[3]] or [[9]]", None, "several different ratings in the judge's answer: [3.0, 9.0]"),
    ("Rating: [[11]]", None, "rating 11 is outside 1-10"),
    ("[" * 100_000, None, "no [[rating]] in the judge's answer"),  # hostile endpoint output is a failure, not a crash
    ('{"rating": 1' + "0" * 5000 + "}", None, "the judge's JSON rating <a number of 5001 characters> is no rating"),
    # a JSON answer is read by its field: brackets its explanation quotes are not ratings
    ('{"explanation": "It returns [3] instead of [1, 2, 3].", "rating": 8}', 8.0, None),
    ('{"explanation": "arr[0] is off by one", "rating": 4}', 4.0, None),
    ('{"explanation": "fine", "rating": "high"}', None, "the judge's JSON rating 'high' is no rating"),
])
def test_ratings_parse_or_say_why_not(text, rating, error):
    assert parse_rating(text) == (rating, error)


@pytest.mark.parametrize(("text", "verdict"), [("B is better. [[A]]", "first"), ("[[B]]", "second"),
                                               ("[[C]]", "tie"), ('{"verdict": "B"}', "second"),
                                               ('{"explanation": "B quotes [[A]] wrongly", "verdict": "B"}', "second")])
def test_verdicts_parse(text, verdict):
    assert parse_verdict(text) == (verdict, None)


def test_unclear_verdicts_are_failures_with_a_reason():
    assert parse_verdict("both fine")[1] == "no [[A]], [[B]] or [[C]] verdict in the judge's answer"
    assert parse_verdict("[[A]] no, [[B]]")[1].startswith("several different verdicts")
    assert parse_verdict('{"explanation": "x", "verdict": "D"}')[1] == "the judge's JSON verdict 'D' is not A, B or C"


@pytest.mark.parametrize(("text", "rating", "verdict"), [
    # answers to FastChat's own prompts are read as its gen_judgment.py reads them (fastchat/llm_judge/common.py),
    # so that a GPT-4-judged MT-Bench score is the number published models report: the first [[n]], else [n]
    ("[[3]] or [[9]]", 3.0, None),
    ("It scores [7] on style. Rating: [[8]]", 8.0, None),  # a double-bracketed rating anywhere comes first
    ("Rating: [7]", 7.0, None),
    ("Rating: [[8.]]", 8.0, None),
    ("Rating: [[ 8 ]]", None, None),  # FastChat's pattern takes no spaces: its score -1, a judge failure here
    ("[" * 100_000, None, None),
    ("[[" + "1" * 100_000, None, None),  # a hostile endpoint's digits: no rating, in linear time (not minutes)
    # a pair: [[A]] anywhere, else [[B]], else [[C]]
    ("[[A]] no, [[B]]", None, "first"),
    ("B is better than A, so [[B]]. Had A been clearer: [[A]]", None, "first"),
    ("[[C]] or [[B]]", None, "second"),
    ("[[ A ]]", None, None),
])
def test_answers_to_fastchats_prompts_are_read_as_fastchat_reads_them(text, rating, verdict):
    assert parse_rating(text, as_fastchat=True)[0] == rating
    assert parse_verdict(text, as_fastchat=True)[0] == verdict
    if rating is None:
        assert parse_rating(text, as_fastchat=True)[1] == "no [[rating]] in the judge's answer"


def test_a_judgment_is_read_as_fastchat_reads_it_only_when_fastchats_prompt_asked_for_it():
    answer = {"generated_text": "[[3]] or [[9]]"}
    asked = {"kind": "grade", "judgment": {"set": "mt_bench", "turn": 1}}
    assert to_judgment({**asked, "prompt_name": "single-v1"}, answer)["rating"] == 3.0
    own = to_judgment(asked, answer)
    assert own["rating"] is None and own["judge_error"].startswith("several different ratings")
    pair = {"kind": "pair", "judgment": {"set": "pairwise", "order": "baseline_first"}}
    fastchats = to_judgment({**pair, "prompt_name": "pair-v2"}, {"generated_text": "[[B]], no: [[A]]"})
    assert fastchats["verdict"] == "opponent"  # A, the baseline's answer here
    assert "verdict" not in to_judgment(pair, {"generated_text": "[[B]], no: [[A]]"})


def test_the_constrained_output_fits_the_judges_token_budget_and_parses():
    for kind, sample in (("grade", "x" * explanation_chars(128) + "\n\nRating: [[10]]"),
                         ("pair", "Both are short.\n\nVerdict: [[C]]")):
        assert re.fullmatch(output_regex(kind, 128), sample)
    assert not re.fullmatch(output_regex("grade", 128), "x" * (explanation_chars(128) + 1) + "\n\nRating: [[3]]")
    assert 2 * explanation_chars(128) + 16 <= 128


def pair_judgment(instruction: str, order: str, verdict_letter: str, model_chars: int = 100,
                  opponent_chars: int = 100) -> dict:
    request = {"kind": "pair", "judgment": {"set": "pairwise", "question_id": instruction, "order": order,
                                            "model": "dpo", "opponent": "sft", "model_chars": model_chars,
                                            "opponent_chars": opponent_chars, "rating": None, "verdict": None}}
    return to_judgment(request, {"generated_text": f"ok\n\nVerdict: [[{verdict_letter}]]", "generation_error": None})


def test_a_judge_that_always_picks_the_first_answer_gives_ties_not_wins():
    judgments = [pair_judgment(str(i), order, "A") for i in range(20) for order in ("model_first", "baseline_first")]
    assert {j["verdict"] for j in judgments if j["order"] == "model_first"} == {"model"}
    assert {j["verdict"] for j in judgments if j["order"] == "baseline_first"} == {"opponent"}
    result = pairwise_results(judgments, samples=500, confidence=0.95)
    assert result["win_rate"] == 0.5 and result["interval"] == [0.5, 0.5] and result["ties"] == 20
    assert result["position_consistency"] == 0.0 and result["first_position_preference"] == 1.0


def test_win_rate_interval_and_failures():
    judgments = [pair_judgment(str(i), order, "A" if order == "model_first" else "B")
                 for i in range(12) for order in ("model_first", "baseline_first")]  # the model wins 12 times
    judgments += [pair_judgment(str(i), order, "B" if order == "model_first" else "A")
                  for i in range(12, 20) for order in ("model_first", "baseline_first")]  # and loses 8
    failed = to_judgment({"kind": "pair", "judgment": {"set": "pairwise", "question_id": "20", "order": "model_first",
                                                       "model": "dpo", "opponent": "sft", "model_chars": 1,
                                                       "opponent_chars": 1, "verdict": None}},
                         {"generated_text": "no idea", "generation_error": None})
    unanswered = {**failed, "question_id": "21", "verdict": None,
                  "judge_error": "not judged: no answer from the model"}  # its generation failed
    result = pairwise_results([*judgments, failed, unanswered], samples=2000, confidence=0.95)
    assert (result["wins"], result["ties"], result["losses"]) == (12, 0, 8)
    assert result["win_rate"] == 0.6 and result["instructions"] == 22 and result["compared"] == 20
    assert result["judge_failures"] == 1 and result["unanswered"] == 1 and result["position_consistency"] == 1.0
    low, high = result["interval"]
    assert 0.35 < low < 0.6 < high < 0.85
    assert bootstrap_interval([0, 1] * 10, 2000, 0.95) == bootstrap_interval([0, 1] * 10, 2000, 0.95)
    # the same judgments in another order (another engine batching, another writer): the same interval
    assert pairwise_results([unanswered, failed, *reversed(judgments)], samples=2000, confidence=0.95) == result


def test_length_control_discounts_wins_that_only_come_with_length():
    # the model wins exactly when its answer is longer, which it is 3 times in 4: raw 75%, about even at equal length
    scores = [1.0] * 15 + [0.0] * 5
    differences = [0.5 + 0.01 * i for i in range(15)] + [-0.5 - 0.01 * i for i in range(5)]
    assert abs(length_controlled(scores, differences) - 0.5) < 0.15
    # an even split with no length effect stays at 50%
    assert length_controlled([1.0, 0.0] * 10, [0.0] * 20) == pytest.approx(0.5, abs=1e-6)
    judgments = [pair_judgment(str(i), order, "A" if (order == "model_first") == (score == 1.0) else "B",
                               model_chars=int(100 * (1 + d)), opponent_chars=100)
                 for i, (score, d) in enumerate(zip(scores, differences, strict=True))
                 for order in ("model_first", "baseline_first")]
    result = pairwise_results(judgments, samples=500, confidence=0.95)
    assert result["win_rate"] == 0.75 and result["length_controlled_win_rate"] < 0.65
    assert [(b["instructions"], b["win_rate"]) for b in result["length_bins"]] == [(5, 0.0), (0, None), (15, 1.0)]
    # the length-controlled rate has its own interval (the fit redone per resample): it holds the rate, and the raw
    # 75% lies outside it
    low, high = result["length_controlled_interval"]
    assert low <= result["length_controlled_win_rate"] <= high < 0.75


def test_grading_results_count_every_turn():
    def judgment(turn, category, rating, error=None):
        return {"set": "mt_bench", "model": "dpo", "turn": turn, "category": category, "rating": rating,
                "judge_error": error, "question_id": "1", "verdict": None}

    results = grading_results([judgment(1, "math", 8.0), judgment(2, "math", 6.0), judgment(1, "writing", 4.0),
                               judgment(2, "writing", None, "not judged: no answer (the engine returned no row)"),
                               judgment(1, "stem", None, "no [[rating]] in the judge's answer")])
    assert results["dpo"] == {"score": 6.0, "turns": {"1": 6.0, "2": 6.0},
                              "categories": {"math": 7.0, "stem": None, "writing": 4.0},
                              "graded": 5, "rated": 3, "unanswered": 1, "judge_failures": 1}


def test_the_screen_finds_shared_ngrams_whatever_the_case_and_punctuation():
    screen = Screen.build([("q1", "Explain how a rainbow forms after a summer storm in the hills."),
                           ("q2", "Name three primary colors."), ("q3", "Hi there")], n=8)
    assert screen.match("PLEASE explain how a rainbow forms, after a summer storm!").item == "q1"
    assert screen.match("explain how a rainbow forms after a summer storm").words == \
        "explain how a rainbow forms after a summer"
    assert screen.match("how a rainbow forms after a summer") is None  # 7 shared words: under n
    assert screen.match("Quick: name three primary colors please").item == "q2"  # shorter than n: matched whole
    assert screen.match("hi there, how are you?") is None  # under MIN_WORDS: not an n-gram to screen with


def test_every_user_turn_of_a_training_row_is_screened():
    """A dialogue (ultrachat_200k's rows) or a multi-turn preference pair whose later user turn is an evaluation
    question is caught, named by its field; assistant turns are not screened (they answer, they do not ask)."""
    from zephyr_ray.data import CONTRACTS, check_row, screened

    screen = Screen.build([("81", "Compose an engaging travel blog post about a recent trip to Hawaii.")], n=8)
    turns = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "Now compose an engaging travel blog post about a recent trip to Hawaii"},
             {"role": "assistant", "content": "Aloha..."}]
    dialogue, _ = check_row(json.dumps({"prompt": "Hi!", "messages": turns}), None, CONTRACTS["dialogue"])
    field, hit = screened(screen, dialogue)
    assert (field, hit.item) == ("messages[2].content", "81")
    pair = {"prompt": "Hi!", "chosen": turns, "rejected": [*turns[:3], {"role": "assistant", "content": "No."}],
            "score_chosen": 8.0, "score_rejected": 2.0}
    preference, _ = check_row(json.dumps(pair), None, CONTRACTS["preference"])
    assert screened(screen, preference)[0] in ("messages[2].content", "chosen[2].content")
    answer_only = [turns[0], {"role": "assistant", "content": turns[2]["content"]}]
    clean, _ = check_row(json.dumps({"prompt": "Hi!", "messages": answer_only}), None, CONTRACTS["dialogue"])
    assert screened(screen, clean) is None


def test_evaluate_sections_are_checked_at_load(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("name: x\nevaluate:\n  judge: {engine: {model: j}, endpoint: {base_url: http://x/v1, model: m}}\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert any("either an `engine`" in p for p in caught.value.problems)
    path.write_text("name: x\nevaluate:\n  judge: {engine: {model: j}}\n  pairwise: {}\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert any("pairwise.prompts" in p for p in caught.value.problems)
    path.write_text("name: x\nevaluate:\n  judge: {engine: {model: j}}\n  model: {name: 'a b'}\n"
                    "  mt_bench: {questions: {path: q.jsonl}}\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert any(p.startswith(f"{path}:4: evaluate.model.name:") for p in caught.value.problems)


def test_pairwise_against_reference_outputs_asks_both_orders_and_settles_missing_outputs():
    from zephyr_ray.config import EvaluateConfig
    from zephyr_ray.evaluate.grading import pairwise_requests
    from zephyr_ray.evaluate.sets import EvaluationSets

    cfg = EvaluateConfig.model_validate({"pairwise": {"prompts": {"path": "alpaca_eval.json"}},
                                         "judge": {"engine": {"model": "judge"}}})
    sets = EvaluationSets(questions=[], counts={}, instructions=[
        {"instruction": "Name a color.", "instruction_id": "i1", "output": "Blue.", "generator": "gpt4",
         "dataset": "helpful_base"},
        {"instruction": "Say hi.", "instruction_id": "i2", "output": None, "generator": None, "dataset": "oasst"}])
    sets.instructions.append({"instruction": "Name a fruit.", "instruction_id": "i3", "output": "Apple.",
                              "generator": "gpt4", "dataset": "helpful_base"})
    answers = {"dpo": [{"set": "pairwise", "question_id": "i1", "answers": ["Red, I think."]},
                       {"set": "pairwise", "question_id": "i2", "answers": ["Hi!"]},
                       {"set": "pairwise", "question_id": "i3", "answers": [""]}]}  # an empty reply: judged
    requests, settled = pairwise_requests(cfg, sets, answers, judge="j")
    assert [json.loads(r["key"]) for r in requests[2:]] == [["pair", "i3", "model_first"],
                                                            ["pair", "i3", "baseline_first"]]
    requests = requests[:2]
    assert [json.loads(r["key"]) for r in requests] == [["pair", "i1", "model_first"], ["pair", "i1", "baseline_first"]]
    first, second = (r["prompt"] for r in requests)
    assert first.index("Red, I think.") < first.index("Blue.") and second.index("Blue.") < second.index("Red, I think.")
    assert {r["judgment"]["opponent"] for r in requests} == {"gpt4"}
    assert [(s["question_id"], s["order"], s["judge_error"]) for s in settled] == [
        ("i2", "model_first", "not judged: no answer from reference outputs"),
        ("i2", "baseline_first", "not judged: no answer from reference outputs")]


def test_fastchats_empty_references_leave_the_question_whole():
    """FastChat's own question.jsonl has empty strings inside `reference` (question 142: a reference for turn 1, ""
    for turn 2; one question has it the other way round): 8 of its 80 questions were rejected for it. Rows in the
    file's exact format (question 142's reference as the file gives it, turns shortened) are accepted; an empty entry
    is no reference for that turn, so turn 2 is graded without references while turn 1 keeps its own."""
    from zephyr_ray.evaluate.prompts import turn_references

    official = [
        '{"question_id": 142, "category": "stem", "turns": ["Consider a satellite ...", "What are some corner cases '
        '...?"], "reference": ["The orbital radius will increase and the period of revolution will increase", ""]}',
        '{"question_id": 111, "category": "math", "turns": ["The vertices of a triangle ...", "What\'s area of the '
        'circle circumscribing the triangle?"], "reference": ["", "5pi"]}',
        '{"question_id": 146, "category": "stem", "turns": ["Please explain ...", "Can a process involve both?"]}',
    ]
    rows = [check_row(line, None, QuestionRow) for line in official]
    assert all(reject is None for _, reject in rows), rows
    satellite, triangle, plain = (row for row, _ in rows)
    assert satellite["reference"] == ["The orbital radius will increase and the period of revolution will increase",
                                      None]
    assert triangle["reference"] == [None, "5pi"] and plain["reference"] is None
    assert turn_references(satellite, 1) == [satellite["reference"][0]] and turn_references(satellite, 2) is None
    one = grade_prompt(satellite, ["It grows.", "None."], turn=1, use_reference=True)
    two = grade_prompt(satellite, ["It grows.", "None."], turn=2, use_reference=True)
    assert "[Reference answer]\nThe orbital radius" in one and "Reference answer" not in two
    assert turn_references(triangle, 1) is None and turn_references(triangle, 2) is None
    _, reject = check_row('{"question_id": 1, "category": "math", "turns": ["q"], "reference": ["", " "]}', None,
                          QuestionRow)
    assert reject is None


def test_arena_hard_questions_read_as_pairwise_instructions_as_they_are():
    """Arena-Hard-Auto's question.jsonl in both of its formats (lines as the files write them, prompts shortened):
    v2.0 (`uid`, `category`, `subcategory`, `prompt`) and v0.1 (`question_id`, `category`, `cluster`, `turns` of
    `{"content": ...}`); the id is kept, the category is the dataset; a row with no prompt is rejected by name."""
    v2 = '{"uid":"ec71c09662a64365","category":"hard_prompt","subcategory":"coding","prompt":"please write a python ' \
         'script that takes a .mp4 file and outputs screenshots taken 10s apart"}'
    v01 = ('{"question_id": "4f8bbc6867bb420aa1c457bffd1a27d1", "category": "arena-hard-v0.1", "cluster": "Keyboard '
           'Key Functions & Layout", "turns": [{"content": "how do you flash a Corne keyboard that has VIA installed"}]}')
    row, reject = check_row(v2, None, InstructionRow)
    assert reject is None and row["instruction_id"] == "ec71c09662a64365" and row["dataset"] == "hard_prompt"
    assert row["instruction"].startswith("please write a python script") and row["output"] is None
    row, reject = check_row(v01, None, InstructionRow)
    assert reject is None and row["instruction_id"] == "4f8bbc6867bb420aa1c457bffd1a27d1"
    assert row["instruction"] == "how do you flash a Corne keyboard that has VIA installed"
    assert row["dataset"] == "arena-hard-v0.1"
    _, reject = check_row('{"uid": "x1", "category": "hard_prompt", "prompt": ""}', None, InstructionRow)
    assert reject["field"] == "instruction" and "empty" in reject["reason"]


def fastchat_prompt_file(path: Path, drop: str | None = None, **changes: dict) -> Path:
    """judge_prompts.jsonl in FastChat's format (its records' fields and templates' placeholders, wording shortened)."""
    records = [
        {"name": "pair-v2", "type": "pairwise", "system_prompt": "Please act as an impartial judge ... output your "
         "final verdict by strictly following this format: \"[[A]]\" if assistant A is better, \"[[B]]\" if "
         "assistant B is better, and \"[[C]]\" for a tie.", "prompt_template": "[User Question]\n{question}\n\n"
         "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n[The Start of "
         "Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]", "description": "Prompt for general "
         "questions", "category": "general", "output_format": "[[A]]"},
        {"name": "single-v1", "type": "single", "system_prompt": "You are a helpful assistant.", "prompt_template":
         "[Instruction]\nPlease act as an impartial judge ... \"[[rating]]\", for example: \"Rating: [[5]]\".\n\n"
         "[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]",
         "description": "Prompt for general questions", "category": "general", "output_format": "[[rating]]"},
        {"name": "single-math-v1", "type": "single", "system_prompt": "You are a helpful assistant.",
         "prompt_template": "[Instruction]\nPlease act as an impartial judge ... You will be given a reference "
         "answer ...\n\n[Question]\n{question}\n\n[The Start of Reference Answer]\n{ref_answer_1}\n[The End of "
         "Reference Answer]\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]",
         "description": "Prompt for general questions", "category": "math", "output_format": "[[rating]]"},
        {"name": "single-v1-multi-turn", "type": "single", "system_prompt": "Please act as an impartial judge ... "
         "focus on the assistant's answer to the second user question ... \"Rating: [[5]]\".\n\n", "prompt_template":
         "<|The Start of Assistant A's Conversation with User|>\n\n### User:\n{question_1}\n\n### Assistant A:\n"
         "{answer_1}\n\n### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n\n<|The End of Assistant A's "
         "Conversation with User|>", "description": "Prompt for general questions", "category": "general",
         "output_format": "[[rating]]"},
        {"name": "pair-v1", "type": "pairwise", "system_prompt": "older", "prompt_template": "{question} {answer_a} "
         "{answer_b}", "description": "an older prompt the project does not use", "category": "general",
         "output_format": "[[rating_a,rating_b]]"},
    ]
    records = [{**r, **changes.get(r["name"], {})} for r in records if r["name"] != drop]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_fastchats_judge_prompts_are_used_where_fastchat_uses_them(tmp_path):
    """evaluate.judge.prompts: FastChat's judge_prompts.jsonl. Turn 1 gets single-v1 (single-math-v1 with the
    reference for a math question that has one), turn 2 single-v1-multi-turn (no math multi-turn prompt in this
    file: the general one), pairwise pair-v2, each with its own system prompt; the judge label names the file. A
    file missing a prompt the evaluation needs, a template with a placeholder FastChat does not fill, or an output
    format the project does not read fails at load with the file, line and prompt (or, where the recipe is loaded away
    from the file, when the evaluation starts)."""
    from zephyr_ray.config import EvaluateConfig
    from zephyr_ray.evaluate.grading import grading_requests, judge_label, pairwise_requests
    from zephyr_ray.evaluate.sets import EvaluationSets

    prompts = fastchat_prompt_file(tmp_path / "judge_prompts.jsonl")
    cfg = EvaluateConfig(model={"name": "dpo"}, mt_bench={"questions": {"path": "q.jsonl"}},
                         pairwise={"baseline": {"name": "sft"}},
                         judge={"engine": {"model": "j"}, "prompts": {"path": str(prompts)}})
    questions = [{"question_id": "81", "category": "writing", "turns": ["Write a haiku.", "Now a limerick."],
                  "reference": None},
                 {"question_id": "111", "category": "math", "turns": ["2+3?", "Times 4?"], "reference": ["5", None]}]
    sets = EvaluationSets(questions, [{"instruction": "Write a haiku.", "instruction_id": "mt_bench:81",
                                       "output": None, "generator": None, "dataset": "mt_bench"}], {})
    answers = {name: [{"set": "mt_bench", "question_id": q["question_id"], "category": q["category"],
                       "turns": q["turns"], "answers": [f"{name} one", f"{name} two"]} for q in questions]
               for name in ("dpo", "sft")}
    requests, settled = grading_requests(cfg, sets, answers, "j")
    by_key = {tuple(json.loads(r["key"])[1:]): r for r in requests}
    haiku1, haiku2 = by_key[("dpo", "81", 1)], by_key[("dpo", "81", 2)]
    assert haiku1["system"] == "You are a helpful assistant." and "[Question]\nWrite a haiku.\n" in haiku1["prompt"]
    assert "Reference Answer" not in haiku1["prompt"] and "dpo one" in haiku1["prompt"]
    assert haiku2["system"].startswith("Please act as an impartial judge ... focus on")
    assert "### User:\nNow a limerick.\n\n### Assistant A:\ndpo two" in haiku2["prompt"]
    math1, math2 = by_key[("dpo", "111", 1)], by_key[("dpo", "111", 2)]
    assert "[The Start of Reference Answer]\n5\n" in math1["prompt"] and math1["judgment"]["reference_used"]
    assert "Reference" not in math2["prompt"] and not math2["judgment"]["reference_used"]  # turn 2 has none
    pairs, _ = pairwise_requests(cfg, sets, answers, "j")
    first = next(r for r in pairs if json.loads(r["key"])[2] == "model_first")
    assert first["system"].endswith('and "[[C]]" for a tie.')
    assert "[User Question]\nWrite a haiku.\n\n[The Start of Assistant A's Answer]\ndpo one\n" in first["prompt"]
    assert "judge prompts judge_prompts.jsonl " in judge_label(cfg.judge)

    def refused(path: Path, **sections) -> str:
        with pytest.raises(ValueError) as caught:
            EvaluateConfig(model={"name": "dpo"}, mt_bench={"questions": {"path": "q.jsonl"}},
                           pairwise={"baseline": {"name": "sft"}},
                           judge={"engine": {"model": "j"}, "prompts": {"path": str(path)}}, **sections)
        return str(caught.value)

    assert "no 'pair-v2' prompt" in refused(fastchat_prompt_file(tmp_path / "a.jsonl", drop="pair-v2"))
    bad = refused(fastchat_prompt_file(tmp_path / "b.jsonl", **{"single-v1": {"prompt_template": "{question} "
                                                                              "{answer} {score}"}}))
    assert "b.jsonl:2: prompt 'single-v1' uses ['answer', 'question', 'score']" in bad
    assert "c.jsonl:1: prompt 'pair-v2' answers in '[[rating]]'" in refused(fastchat_prompt_file(
        tmp_path / "c.jsonl", **{"pair-v2": {"output_format": "[[rating]]"}}))

    # A recipe loaded where the file is not (Serve loads the whole recipe from its own directory) loads; the
    # evaluation, which needs the file, names it before any engine starts.
    elsewhere = EvaluateConfig(model={"name": "dpo"}, mt_bench={"questions": {"path": "q.jsonl"}},
                               judge={"engine": {"model": "j"}, "prompts": {"path": "not/here/judge_prompts.jsonl"}})
    with pytest.raises(ValueError, match="not/here/judge_prompts.jsonl: no such judge prompts file"):
        elsewhere.check_judge_prompts()


def test_fastchats_own_mt_bench_files_are_read_whole_and_each_turn_gets_fastchats_prompt(ray_local, tmp_path):
    """FastChat's question.jsonl (80 questions; 8 hold an empty string in `reference`), its GPT-4 reference answers
    and its judge_prompts.jsonl, unchanged: every question is accepted and all 160 turns are graded. Each turn gets the
    prompt FastChat's gen_judgment.py gives it: single-math-v1 (its multi-turn one on turn 2) with the references for
    the 30 math, reasoning and coding questions, single-v1 for the 50 others, pair-v2 for the pairwise comparison.
    With the question file alone, a turn whose reference is empty is graded without one."""
    from zephyr_ray.config import EvaluateConfig
    from zephyr_ray.evaluate.grading import grading_requests, pairwise_requests
    from zephyr_ray.evaluate.sets import evaluation_sets

    def graded(run_dir: Path, **mt_bench) -> tuple[dict, list[dict], dict[str, dict]]:
        cfg = EvaluateConfig(model={"name": "dpo"}, pairwise={"baseline": {"name": "sft"}},
                             mt_bench={"questions": {"path": str(FASTCHAT / "question.jsonl")}, **mt_bench},
                             judge={"engine": {"model": "j"},
                                    "prompts": {"path": str(FASTCHAT / "judge_prompts.jsonl")}})
        sets = evaluation_sets(cfg, run_dir)
        answers = {name: [{"set": "mt_bench", "question_id": q["question_id"], "category": q["category"],
                           "turns": q["turns"], "answers": [f"{name} {q['question_id']} answer {t}" for t in (1, 2)],
                           "errors": [None, None]} for q in sets.questions] for name in ("dpo", "sft")}
        requests, settled = grading_requests(cfg, sets, {"dpo": answers["dpo"]}, "j")
        assert not settled
        pairs, unpaired = pairwise_requests(cfg, sets, answers, "j")
        assert not unpaired and len(pairs) == 160 and {r["prompt_name"] for r in pairs} == {"pair-v2"}
        return sets.counts, requests, {q["question_id"]: q for q in sets.questions}

    lines = (FASTCHAT / "question.jsonl").read_text().splitlines()
    with_empty = [q for q in map(json.loads, lines) if "" in (q.get("reference") or [])]
    assert len(lines) == 80 and len(with_empty) == 8  # the file as FastChat ships it

    counts, requests, questions = graded(tmp_path / "with-answers",
                                         reference_answers={"path": str(FASTCHAT / "reference_answer_gpt-4.jsonl")})
    assert (counts["questions"]["accepted"], counts["questions"]["rejected"]) == (80, 0)
    assert (counts["reference_answers"]["accepted"], counts["reference_answers"]["rejected"]) == (30, 0)
    assert Counter(r["prompt_name"] for r in requests) == {"single-v1": 50, "single-v1-multi-turn": 50,
                                                           "single-math-v1": 30, "single-math-v1-multi-turn": 30}
    references = {r["question_id"]: r["choices"][0]["turns"] for r in map(
        json.loads, (FASTCHAT / "reference_answer_gpt-4.jsonl").read_text().splitlines())}
    for request in requests:
        _, _, question_id, turn = json.loads(request["key"])
        if request["prompt_name"].startswith("single-math"):
            assert all(ref in request["prompt"] for ref in references[int(question_id)][:turn]), question_id
            assert questions[question_id]["category"] in ("math", "reasoning", "coding")

    counts, requests, questions = graded(tmp_path / "questions-only")
    assert (counts["questions"]["accepted"], counts["questions"]["rejected"]) == (80, 0)
    math = {tuple(json.loads(r["key"])[2:]) for r in requests if r["prompt_name"].startswith("single-math")}
    expected = {(q["question_id"], turn) for q in map(json.loads, lines) for turn in (1, 2)
                if q["category"] in ("math", "reasoning", "coding") and q.get("reference")
                and all(q["reference"][:turn])}
    assert math == {(str(question_id), turn) for question_id, turn in expected} and len(requests) == 160
