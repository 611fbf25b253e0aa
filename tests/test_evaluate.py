"""The evaluate stage with real vLLM engines on Ray Data: MT-Bench-style grading of the shipped question set, the
pairwise win rate of a model against itself, the judge behind an OpenAI-compatible server (and the feedback stage's
`openai` judge kind, here so that one test process starts that server for both); and decontamination of training
prompts against the evaluation set, through the stages that read them."""

import json
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import (
    completions,
    few_prompts_of_tiny_run,
    free_port,
    record_reliability,
    rejudge,
    tiny_recipe,
    tiny_recipe_data,
)
from typer.testing import CliRunner

from zephyr_ray.cli import app
from zephyr_ray.config import MT_BENCH_TEMPERATURES, DatasetSource, load_recipe
from zephyr_ray.data import InstructionRow, PromptRow, load, validated_once
from zephyr_ray.evaluate.sets import training_screen
from zephyr_ray.feedback.judge import ASPECTS
from zephyr_ray.report import write_report
from zephyr_ray.stages import run_stage

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = [json.loads(line) for line in (REPO / "jobs" / "data" / "tiny_mt_bench.jsonl").read_text().splitlines()]


def recipe_file(tmp: Path, tiny_models: dict, evaluate: dict | None = None, **sections) -> Path:
    """tiny-cpu.yaml on the test's tiny models, with its evaluate section changed by ``evaluate``."""
    data = tiny_recipe_data(tiny_models)
    # these tests read the project's own prompts on the tiny judge, every answer held to the structured output (the
    # tiny world's pairwise judge, its prompts and free verdicts are the demo's)
    for key in ("prompts", "structured_output"):
        data["evaluate"]["judge"].pop(key)
    data["evaluate"]["judge"]["engine"]["model"] = str(tiny_models["judge"])
    data["evaluate"].update(evaluate or {})
    data.update(sections)
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(data))
    return tmp / "recipe.yaml"


def one_question_per_category(tmp: Path) -> Path:
    """The shipped questions, the first of each category (8 of 16): for the tests that judge the fixture's answers
    again, which prove per category what they prove on all (and cost half the judge's time)."""
    seen, kept = set(), []
    for question in QUESTIONS:
        if question["category"] not in seen:
            seen.add(question["category"])
            kept.append(question)
    path = tmp / "one_per_category.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in kept))
    return path


def rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


@pytest.fixture(scope="module")
def evaluated(tiny_models, ray_local, tmp_path_factory):
    """generator-0 graded on the shipped questions, and against itself (two names, one engine), by the tiny judge."""
    tmp = tmp_path_factory.mktemp("evaluate")
    engine = {"model": str(tiny_models["generator-0"]), "max_model_len": 512, "batch_size": 16, "kv_cache_gib": 0.5}
    checkable = tmp / "gsm8k_style.jsonl"  # GSM8K's own row format, a plain answer, and one unusable row
    checkable.write_text("\n".join(json.dumps(row) for row in [
        *({"question": f"Tom has {a} apples and buys {b} more. How many apples does he have now?",
           "answer": f"Tom has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
          for a, b in ((2, 3), (4, 4), (10, 5), (7, 1))),
        {"question": "What is 6 times 7?", "answer": 42},
        {"question": "A question with no answer"},
    ]) + "\n")
    recipe = load_recipe(recipe_file(tmp, tiny_models, {
        "model": {"name": "gen0", **engine},
        "pairwise": {"baseline": {"name": "gen0-again", **engine}},
        "exact_match": {"questions": {"path": str(checkable)}, "answer_pattern": "last_number",
                        "sampling": {"temperature": 0.0, "max_tokens": 32}},
    }))
    run_dir = tmp / "run"
    return recipe, run_dir, run_stage("evaluate", recipe, run_dir)


def recipe_path(run_dir: Path) -> Path:
    return run_dir.parent / "recipe.yaml"


pytestmark = pytest.mark.timeout(1200)


@pytest.mark.engine
def test_every_turn_of_the_shipped_questions_gets_a_rating_or_a_counted_failure(evaluated):
    _, run_dir, result = evaluated
    results = json.loads((run_dir / "evaluate" / "results.json").read_text())
    judgments = rows(run_dir / "evaluate" / "judgments")
    graded = [j for j in judgments if j["set"] == "mt_bench"]
    keys = {(j["model"], j["question_id"], j["turn"]) for j in graded}
    assert keys == {(m, str(q["question_id"]), t) for m in ("gen0", "gen0-again") for q in QUESTIONS for t in (1, 2)}
    assert len(graded) == len(keys) == 64
    for j in graded:
        assert (j["rating"] is None) != (j["judge_error"] is None), j
        assert j["rating"] is None or 1 <= j["rating"] <= 10
    for model in ("gen0", "gen0-again"):
        r = results["mt_bench"][model]
        assert r["graded"] == 32 and r["rated"] + r["unanswered"] + r["judge_failures"] == 32
        assert r["rated"] >= 16 and 1 <= r["score"] <= 10
        assert set(r["categories"]) == {q["category"] for q in QUESTIONS}
    assert result.counts["judgments"] == len(judgments) and result.counts["questions"]["accepted"] == 16
    # reference-guided for math, reasoning and coding only; turn 2 is judged with turn 1's answer before it
    for j in graded:
        if j["judge_prompt"] is not None:
            assert j["reference_used"] == (j["category"] in ("math", "reasoning", "coding"))
            assert ("[Reference answer" in j["judge_prompt"]) == j["reference_used"]
    answers = {(a["model"], a["question_id"]): a for a in rows(run_dir / "evaluate" / "answers" / "gen0")}
    for q in QUESTIONS:
        answer = answers[("gen0", str(q["question_id"]))]
        assert answer["temperature"] == MT_BENCH_TEMPERATURES[q["category"]]
        assert answer["turns"] == q["turns"] and len(answer["answers"]) == 2
        judged = next(j for j in graded if j["model"] == "gen0" and j["question_id"] == str(q["question_id"])
                      and j["turn"] == 2)
        if judged["judge_prompt"] is not None:
            assert judged["judge_prompt"].index(answer["answers"][0]) < judged["judge_prompt"].index(q["turns"][1])


@pytest.mark.engine
def test_a_model_against_itself_wins_half_within_its_interval(evaluated):
    _, run_dir, _ = evaluated
    pairwise = json.loads((run_dir / "evaluate" / "results.json").read_text())["pairwise"]
    assert pairwise["instructions"] == 16 and pairwise["judgments"] == 32
    assert pairwise["compared"] >= 12
    low, high = pairwise["interval"]
    assert low <= 0.5 <= high, pairwise
    assert pairwise["wins"] + pairwise["ties"] + pairwise["losses"] == pairwise["compared"]
    assert 0 <= pairwise["length_controlled_win_rate"] <= 1
    judged = [j for j in rows(run_dir / "evaluate" / "judgments") if j["set"] == "pairwise"]
    assert {j["order"] for j in judged} == {"model_first", "baseline_first"}
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert metrics["win_rate"] == pairwise["win_rate"] and "mt_bench/gen0" in metrics


@pytest.mark.engine
def test_exact_match_scores_each_model_on_the_checkable_questions_and_rejects_the_unusable_row(evaluated):
    """GSM8K-format rows read as they are (one row without an answer is rejected, with its reason): both models'
    accuracy with an interval and the count of replies with no number in them; greedy answers from one engine, so
    the paired difference of the two names is exactly 0."""
    _, run_dir, result = evaluated
    results = json.loads((run_dir / "evaluate" / "results.json").read_text())
    assert result.counts["exact_match_questions"]["accepted"] == 5
    assert result.counts["exact_match_questions"]["rejected"] == 1
    (reject,) = rows(run_dir / "evaluate" / "exact_match_rejects")
    assert (reject["row"], reject["field"], reject["reason"]) == (6, "answer", "missing field"), reject
    for model in ("gen0", "gen0-again"):
        r = results["exact_match"][model]
        assert r["n"] == 5 and 0 <= r["unparsed"] <= 5 and 0.0 <= r["accuracy"] <= 1.0
        assert r["interval"][0] <= r["accuracy"] <= r["interval"][1]
    scored = rows(run_dir / "evaluate" / "exact_match")
    assert len(scored) == 10 and {s["model"] for s in scored} == {"gen0", "gen0-again"}
    for s in scored:
        assert s["correct"] == (s["extracted"] is not None and float(s["extracted"].replace(",", "")) == float(
            s["reference"].rsplit("####", 1)[-1].strip()))
    assert results["exact_match"]["gen0"]["accuracy"] == results["exact_match"]["gen0-again"]["accuracy"]
    (paired,) = results["exact_match_paired"]
    assert (paired["model"], paired["over"], paired["n"], paired["difference"]) == ("gen0", "gen0-again", 5, 0.0)
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert metrics["exact_match/gen0"] == results["exact_match"]["gen0"]["accuracy"]
    answered = [a for a in rows(run_dir / "evaluate" / "answers" / "gen0") if a["set"] == "exact_match"]
    assert len(answered) == 5  # asked in the same engine pass as the other sets


@pytest.mark.engine
def test_rerun_skips_and_the_report_shows_the_evaluation(evaluated, tmp_path):
    recipe, run_dir, result = evaluated
    again = run_stage("evaluate", recipe, run_dir)
    assert again.skipped and again.counts == result.counts
    # the command prints the numbers (in-process: it joins this test's Ray)
    out = CliRunner().invoke(app, ["evaluate", str(recipe_path(run_dir)), "--run-dir", str(run_dir),
                                   "--export", str(tmp_path / "export")])
    assert out.exit_code == 0, out.output
    assert "MT-Bench gen0: " in out.output
    assert f"exported: {tmp_path / 'export' / 'model_judgment' / 'judge_single.jsonl'}" in out.output
    assert re.search(r"win rate gen0 vs gen0-again: \d+\.\d% \[\d+\.\d%, \d+\.\d%\]", out.output), out.output
    page = write_report(run_dir, tmp_path / "report.html").read_text()
    evaluation = page[page.index("<h2>Evaluation</h2>"):]
    assert evaluation.startswith('<h2>Evaluation</h2><img alt="Evaluation" src="data:image/png;base64,')
    assert "MT-Bench gen0:" in evaluation and "win rate gen0 vs gen0-again" in evaluation
    exact = r"exact match gen0: \d+\.\d% \[\d+\.\d%, \d+\.\d%\] of 5 questions \(\d with no answer found\)"
    assert re.search(exact, out.output) and re.search(exact, evaluation), out.output


@pytest.mark.engine
def test_a_rerun_after_the_judgments_reads_the_judge_agreement_instead_of_scoring_again(evaluated):
    """An evaluation stopped after its judgments were written, before its results: the re-run makes the same
    results from what is on disk. The feedback judge's scores of the exact-match replies (its agreement with the
    truth) are read from ``judge_agreement/``, one row per scored reply, not scored again: its files are the same."""
    recipe, run_dir, _ = evaluated
    stage = run_dir / "evaluate"
    before = json.loads((stage / "results.json").read_text())
    agreement = before["judge_agreement"]
    judged = rows(stage / "judge_agreement")
    assert len(judged) == sum(1 for r in rows(stage / "exact_match") if r["reply"]) > 0
    assert agreement["n"] + agreement["judge_failures"] == len(judged)
    files = {path.name: path.stat().st_mtime_ns for path in (stage / "judge_agreement").iterdir()}
    (stage / "results.json").unlink()
    again = run_stage("evaluate", recipe, run_dir)
    assert not again.skipped and json.loads((stage / "results.json").read_text()) == before
    assert {path.name: path.stat().st_mtime_ns for path in (stage / "judge_agreement").iterdir()} == files


@pytest.mark.engine
def test_fastchats_judge_prompts_grade_and_compare_through_the_whole_stage(evaluated, tiny_models, tmp_path):
    """The evaluation again with `judge.prompts` (FastChat's judge_prompts.jsonl format, written here) on the same
    answers: every judgment's prompt is FastChat's template filled as FastChat fills it, every turn is rated or a
    counted failure, and the judge label names the prompt file."""
    from test_evaluate_rules import fastchat_prompt_file

    recipe, run_dir, _ = evaluated
    prompts = fastchat_prompt_file(tmp_path / "judge_prompts.jsonl")
    data = yaml.safe_load(recipe_path(run_dir).read_text())
    data["evaluate"]["judge"]["prompts"] = {"path": str(prompts)}
    data["evaluate"]["exact_match"] = None
    data["evaluate"]["mt_bench"]["questions"] = {"path": str(one_question_per_category(tmp_path))}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    other = tmp_path / "run"
    shutil.copytree(run_dir / "evaluate" / "answers", other / "evaluate" / "answers")  # judged again, not answered
    run_stage("evaluate", load_recipe(tmp_path / "recipe.yaml"), other)
    judgments = rows(other / "evaluate" / "judgments")
    graded = [j for j in judgments if j["set"] == "mt_bench"]
    assert len(graded) == 32 and all((j["rating"] is None) != (j["judge_error"] is None) for j in graded)
    for j in graded:
        if j["judge_prompt"] is None:
            continue
        if j["turn"] == 1:
            assert j["judge_prompt"].startswith("[Instruction]\nPlease act as an impartial judge")
            assert ("[The Start of Reference Answer]" in j["judge_prompt"]) == j["reference_used"]
        else:
            assert j["judge_prompt"].startswith("<|The Start of Assistant A's Conversation with User|>")
    paired = [j for j in judgments if j["set"] == "pairwise" and j["judge_prompt"] is not None]
    assert paired and all(j["judge_prompt"].startswith("[User Question]\n") for j in paired)
    results = json.loads((other / "evaluate" / "results.json").read_text())
    assert "judge prompts judge_prompts.jsonl" in results["judge"]
    assert all(r["rated"] + r["unanswered"] + r["judge_failures"] == 16 for r in results["mt_bench"].values())
    assert any(j["reference_used"] for j in graded), "a math, reasoning or coding question graded with its reference"


@pytest.mark.engine
@pytest.mark.reliability("security", "the evaluation judge's API key planted in the environment")
def test_the_judge_behind_an_openai_compatible_server(evaluated, tiny_models, judge_server, tmp_path, monkeypatch):
    """The same answers judged through vLLM's OpenAI server (the answers are reused: only the judge runs)."""
    _, run_dir, _ = evaluated
    url, key = judge_server
    monkeypatch.setenv("ZR_TEST_EVAL_JUDGE_KEY", key)
    other = tmp_path / "run"
    shutil.copytree(run_dir / "evaluate" / "answers", other / "evaluate" / "answers")
    engine = {"model": str(tiny_models["generator-0"]), "max_model_len": 512, "kv_cache_gib": 0.5}
    recipe = load_recipe(recipe_file(tmp_path, tiny_models, {
        "model": {"name": "gen0", **engine}, "pairwise": {"baseline": {"name": "gen0-again", **engine}},
        "mt_bench": {"questions": {"path": str(one_question_per_category(tmp_path))}, "max_tokens": 64},
        "exact_match": None,  # the endpoint judges grading and pairs; exact match is the fixture's
        "judge": {"endpoint": {"base_url": url, "model": "tiny-judge", "api_key_env": "ZR_TEST_EVAL_JUDGE_KEY",
                               "qps": 50, "max_in_flight": 8, "structured_output": "regex"},
                  "sampling": {"temperature": 0.0, "max_tokens": 128}},
    }))
    run_stage("evaluate", recipe, other)
    results = json.loads((other / "evaluate" / "results.json").read_text())
    assert results["judge"].startswith(f"tiny-judge @ {url}")
    for r in results["mt_bench"].values():
        assert r["graded"] == 16 and r["rated"] + r["unanswered"] + r["judge_failures"] == 16 and r["rated"] >= 8
    low, high = results["pairwise"]["interval"]
    assert low <= 0.5 <= high
    write_report(other)
    files = [path for path in other.rglob("*") if path.is_file()]
    for path in files:
        assert key.encode() not in path.read_bytes(), f"the API key leaked into {path}"
    record_reliability("security", "the evaluation judge's API key planted in the environment",
                       f"MT-Bench grading and win rate through the endpoint; the key in none of the {len(files)} "
                       "files of the run directory (answers, judgments, results, metrics, report.html)", "nothing")


@pytest.mark.engine
@pytest.mark.reliability(
    "security",
    "a judge endpoint's API key planted in the environment; a wrong key; the endpoint down")
def test_openai_judge_scores_through_a_local_openai_compatible_server(tiny_run, tiny_models, judge_server, tmp_path,
                                                                      monkeypatch, caplog):
    """The feedback stage's `openai` judge kind on the demo's completions of 16 prompts (here beside the evaluation's
    endpoint test, so that one test process starts the server for both)."""
    run_dir = few_prompts_of_tiny_run(tiny_run, tmp_path / "few", ("complete",))
    url, key = judge_server
    monkeypatch.setenv("ZR_TEST_JUDGE_KEY", key)

    def judge_with(name: str, **endpoint_changes) -> list[dict]:
        endpoint = {"base_url": url, "model": "tiny-judge", "api_key_env": "ZR_TEST_JUDGE_KEY", "qps": 50,
                    "max_retries": 1, "structured_output": "regex", "max_in_flight": 4, **endpoint_changes}
        recipe = load_recipe(tiny_recipe(tmp_path / name, tiny_models, judge={"kind": "openai", "engine": None,
                                                                               "endpoint": endpoint}))
        judgments, judgeable, _ = rejudge(run_dir, recipe, tmp_path / name / "run")
        assert len(judgments) == len(completions(run_dir))
        return judgeable

    (tmp_path / "ok").mkdir()
    judged = judge_with("ok")
    scored = [r for r in judged if r["judge_error"] is None]
    assert len(scored) >= 0.8 * len(judged) > 0
    assert all(1 <= r["overall"] <= 10 and all(1 <= r[a] <= 5 for a in ASPECTS) for r in scored)
    assert all(r["judge"].startswith(f"tiny-judge @ {url}") for r in scored)

    # a wrong key and an endpoint that is down: every row says why, nothing crashes, the key shows nowhere
    monkeypatch.setenv("ZR_TEST_JUDGE_KEY", "wrong-" + key)
    (tmp_path / "denied").mkdir()
    denied = judge_with("denied")
    assert denied and all(r["judge_error"].startswith("judge failed: HTTP 401") for r in denied)
    (tmp_path / "down").mkdir()
    down = judge_with("down", base_url=f"http://127.0.0.1:{free_port()}/v1")
    assert down and all("APIConnectionError" in r["judge_error"] for r in down)
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    for path in files:
        assert key.encode() not in path.read_bytes(), f"the API key leaked into {path}"
    assert key not in caplog.text
    record_reliability("security", "a judge endpoint's API key planted in the environment; a wrong key; the "
                       "endpoint down", f"judged with the key; wrong key: every row `judge failed: HTTP 401`; down: "
                       f"every row `APIConnectionError`; the key found in none of {len(files)} files of the run "
                       "directories, nor in the logs", "nothing: every completion has a judgment row")


def planted_training_prompts(path: Path) -> int:
    """Clean prompts, near misses (7 shared words) and 3 planted overlaps with the shipped questions; returns the
    number planted."""
    clean = [json.loads(line)["prompt"] for line in (REPO / "jobs" / "data" / "tiny_prompts.jsonl").read_text()
             .splitlines()][:8]
    planted = [
        "Tom is taller than Sam. Sam is taller than Ann. Who is the shortest?",  # question 105, verbatim
        "Quick one. PRETEND you are a pirate captain -- tell me about your ship!",  # 103, other case and punctuation
        "Tell me which bread from your shop would you suggest for lunch",  # 8 words of 104's second turn
    ]
    near_misses = ["I wonder: bread from your shop would you suggest?",  # 7 words of 104's second turn
                   "Is Tom taller than Sam or not?"]
    prompts = clean + planted + near_misses
    path.write_text("".join(json.dumps({"prompt": p, "messages": [{"role": "user", "content": p},
                                                                    {"role": "assistant", "content": "Sure."}]})
                            + "\n" for p in prompts))
    return len(planted)


def test_decontamination_counts_planted_overlaps_and_drops_them_into_the_rejects(tiny_models, ray_local, tmp_path):
    data = tmp_path / "train.jsonl"
    planted = planted_training_prompts(data)
    total = len(data.read_text().splitlines())

    # counted only (drop: false): every prompt kept, the overlaps counted
    recipe = load_recipe(recipe_file(tmp_path / "count", tiny_models, {"decontaminate": {"ngram": 8, "drop": False}}))
    run_dir = tmp_path / "count" / "run"
    screen = training_screen(recipe, run_dir)
    counts = validated_once(DatasetSource(path=str(data)), PromptRow, run_dir / "prompts", run_dir / "rejects",
                            screen=screen)
    assert (counts["total"], counts["accepted"], counts["rejected"], counts["contaminated"]) == (total, total, 0,
                                                                                                 planted)

    # dropped (the tiny recipe's setting), through a stage: synthesize reading an existing dialogue set
    recipe = load_recipe(recipe_file(tmp_path / "drop", tiny_models, synthesize={"dataset": {"path": str(data)}}))
    run_dir = tmp_path / "drop" / "run"
    result = run_stage("synthesize", recipe, run_dir)
    assert (result.counts["total"], result.counts["accepted"], result.counts["rejected"],
            result.counts["contaminated"]) == (total, total - planted, planted, planted)
    rejects = rows(run_dir / "synthesize" / "rejects")
    assert sorted(r["reason"].split("evaluation prompt ")[1].split(":")[0] for r in rejects) == [
        "mt_bench 103 turn 1", "mt_bench 104 turn 2", "mt_bench 105 turn 1"]
    assert all(r["reason"].startswith("contaminated: shares") and r["field"] == "prompt" for r in rejects)
    assert {json.loads(r["raw"])["prompt"] for r in rejects} <= {json.loads(line)["prompt"]
                                                                     for line in data.read_text().splitlines()}
    again = run_stage("synthesize", recipe, run_dir)  # a re-run reports what the first run found
    assert again.skipped and again.counts["contaminated"] == planted
    caption = write_report(run_dir).read_text()
    assert f"synthesize: {planted} of {total} prompts overlap the evaluation" in caption


def test_alpacaeval_json_lists_load_as_they_are_and_a_broken_file_is_one_reject(ray_local, tmp_path):
    good = tmp_path / "alpaca_eval.json"
    good.write_text(json.dumps([
        {"instruction": "Name a color.", "output": "Blue.", "generator": "ref", "dataset": "helpful_base"},
        {"instruction": "Say hi.", "output": "Hi!", "generator": "ref", "dataset": "oasst"},
        {"output": "no instruction", "generator": "ref", "dataset": "oasst"},
    ], indent=2))
    loaded = load(str(good), InstructionRow)
    assert (loaded.report.accepted, loaded.report.rejected) == (2, 1)
    reject = loaded.rejected.take_all()[0]
    assert (reject["row"], reject["field"], reject["reason"]) == (3, "instruction", "missing field")
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "x"},\n  {"instruction": ')
    loaded = load(str(broken), InstructionRow)
    assert (loaded.report.accepted, loaded.report.rejected) == (0, 1)
    assert loaded.rejected.take_all()[0]["reason"].startswith("not a valid JSON list: Expecting value at line 2")


def test_the_demos_evaluation_exports_in_fastchats_and_alpacaevals_formats(tiny_run, tmp_path):
    """`--export`: the demo's answers in FastChat's model_answer format (every question, both turns, `$ERROR$` for a
    missing turn) and its judgments in FastChat's model_judgment format; show_result.py's own arithmetic on the
    single-grading file (the mean score of the turns with a score other than -1, per model) gives our MT-Bench
    scores, and each pairwise game's winners follow our verdicts in FastChat's terms."""
    from collections import defaultdict

    from zephyr_ray.evaluate.official_formats import export_evaluation

    written = export_evaluation(tiny_run, tmp_path, "judge")
    results = json.loads((tiny_run / "evaluate" / "results.json").read_text())
    names = {p.relative_to(tmp_path).as_posix() for p in written}
    assert {"model_answer/dpo.jsonl", "model_answer/sft.jsonl", "model_judgment/judge_single.jsonl",
            "model_judgment/judge_pair.jsonl"} <= names
    assert "model_answer/base.jsonl" not in names  # it answered the exact-match questions only
    for model in ("dpo", "sft"):
        answers = [json.loads(line) for line in (tmp_path / "model_answer" / f"{model}.jsonl").read_text().splitlines()]
        assert sorted(a["question_id"] for a in answers) == sorted(int(q["question_id"]) for q in QUESTIONS)
        assert all(a["model_id"] == model and len(a["choices"][0]["turns"]) == 2 for a in answers)
        assert all(isinstance(t, str) and t for a in answers for t in a["choices"][0]["turns"])
    single = [json.loads(line) for line in (tmp_path / "model_judgment" / "judge_single.jsonl").read_text().splitlines()]
    scores = defaultdict(list)
    for row in single:
        assert row["judge"][0] == "judge" and row["turn"] in (1, 2) and isinstance(row["question_id"], int)
        if row["score"] != -1:
            scores[row["model"]].append(row["score"])
    for model, graded in results["mt_bench"].items():
        assert sum(scores[model]) / len(scores[model]) == pytest.approx(graded["score"])
        assert len(scores[model]) == graded["rated"]
    pairs = [json.loads(line) for line in (tmp_path / "model_judgment" / "judge_pair.jsonl").read_text().splitlines()]
    assert len(pairs) == results["pairwise"]["instructions"]
    won = sum(p["g1_winner"] == p["g2_winner"] == "model_1" for p in pairs)
    lost = sum(p["g1_winner"] == p["g2_winner"] == "model_2" for p in pairs)
    assert won <= results["pairwise"]["wins"] and lost <= results["pairwise"]["losses"]
    assert all(p["model_1"] == "dpo" and p["model_2"] == "sft" and p["g1_winner"] in
               ("model_1", "model_2", "tie", "error") for p in pairs)
