"""Iterative rounds (`rounds:`) through `zephyr-ray run`'s code on the demo's finished run: the recipe's own stages
are skipped, two rounds run on real engines and Ray Train (round 2 sampling round 1's model, DPO against the dSFT
reference), each round is evaluated against dSFT, the manifest lists every round and stage, and a re-run redoes
nothing. Small on purpose (8 prompts a round, only the policy's 3 samples, one DPO epoch): the shipped
tiny-cpu-rounds.yaml runs the full size, and its numbers are in docs/tiny-world.md."""

import json
import logging
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import REPO, copy_of_tiny_run, render_page

pytestmark = [pytest.mark.engine, pytest.mark.timeout(1800)]
ROUND_STAGES = ("complete", "judge", "binarize", "train_dpo", "evaluate")


@pytest.fixture(scope="module")
def rounds_run(tiny_run, ray_local, tmp_path_factory):
    """(run dir, manifest): the demo's run with two small rounds added to its recipe (the shipped
    tiny-cpu-rounds.yaml's settings, cut down), run as `zephyr-ray run` runs a recipe."""
    from zephyr_ray.run import run_recipe

    run_dir = copy_of_tiny_run(tiny_run, tmp_path_factory.mktemp("rounds"))
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    shipped = yaml.safe_load((REPO / "jobs" / "configs" / "tiny-cpu-rounds.yaml").read_text())["rounds"]
    recipe["rounds"] = {**shipped, "pool": "replace", "samples": 3, "prompts": "resample", "prompts_per_round": 8,
                        "reference": "sft", "dpo": {"num_epochs": 1},
                        "sampling": {"temperature": 1.0, "max_tokens": 32}}
    recipe["evaluate"]["exact_match"]["questions"]["limit"] = 16
    recipe["evaluate"]["pairwise"]["prompts"]["limit"] = 8
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    said = logging.getLogger("zephyr_ray.rounds")
    level, handler = said.level, logging.FileHandler(run_dir / "rounds-said.log")
    said.setLevel(logging.INFO)
    said.addHandler(handler)
    try:
        return run_dir, run_recipe(run_dir / "recipe.yaml", run_dir)
    finally:
        said.removeHandler(handler)
        handler.close()
        said.setLevel(level)


def rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_the_manifest_lists_every_round_and_stage_after_the_recipes_own(rounds_run):
    run_dir, manifest = rounds_run
    statuses = {stage: record["status"] for stage, record in manifest["stages"].items()}
    assert all(statuses[stage] == "skipped" for stage in ("synthesize", "train_sft", "train_dpo", "evaluate"))
    expected = [f"rounds/{r}/{stage}" for r in (1, 2) for stage in ROUND_STAGES]
    assert [key for key in statuses if key.startswith("rounds/")] == expected
    assert all(statuses[key] == "done" for key in expected), statuses
    assert [row["round"] for row in manifest["rounds"]] == [1, 2]


def test_each_round_samples_the_policy_of_the_round_before_and_pairs_best_with_worst(rounds_run):
    run_dir, _ = rounds_run
    policies = [yaml.safe_load((run_dir / "rounds" / str(r) / "recipe.yaml").read_text())["complete"]["models"]
                for r in (1, 2)]
    sft, round_1 = run_dir.resolve() / "train_sft" / "model", run_dir.resolve() / "rounds" / "1" / "train_dpo" / "model"
    assert [[m["engine"]["model"] for m in models] for models in policies] == [[str(sft)], [str(round_1)]]
    for r in (1, 2):
        folder = run_dir / "rounds" / str(r)
        prompts = [json.loads(line)["prompt_id"] for line in (folder / "prompts.jsonl").read_text().splitlines()]
        completions = rows(folder / "complete" / "models" / "policy")
        assert len(prompts) == 8 and sorted((c["prompt_id"], c["model"]) for c in completions) == sorted(
            (p, f"policy-{i}") for p in prompts for i in (1, 2, 3))
        judged = {(j["prompt_id"], j["model"]): j for j in rows(folder / "judge" / "judgments")}
        assert len(judged) == len(completions)
        for pair in rows(folder / "binarize" / "preferences"):
            assert pair["score_chosen"] >= pair["score_rejected"] and pair["chosen_model"] != pair["rejected_model"]
        # round 2's DPO: from round 1's model, against the dSFT reference
        dpo = yaml.safe_load((folder / "recipe.yaml").read_text())["train_dpo"]
        assert dpo["model"] == policies[r - 1][0]["engine"]["model"] and dpo["num_epochs"] == 1
        assert dpo.get("reference") == (str(run_dir.resolve() / "train_sft" / "model") if r == 2 else None)
        assert (folder / "train_dpo" / "model" / "model.safetensors").is_file()
    assert (run_dir / "rounds" / "1" / "prompts.jsonl").read_text() != (
        run_dir / "rounds" / "2" / "prompts.jsonl").read_text(), "resampled: each round draws again"


def test_every_round_is_evaluated_against_dsft_and_the_report_plots_them(rounds_run, tmp_path):
    from zephyr_ray.feedback.binarize import score_of
    from zephyr_ray.report import rounds_html, write_report

    run_dir, _ = rounds_run
    summary = json.loads((run_dir / "rounds" / "summary.json").read_text())
    assert [row["round"] for row in summary["rounds"]] == [1, 2]
    for row in summary["rounds"]:
        exact, win = row["exact_match"], row["win_rate_vs_sft"]
        assert exact["n"] == 16 and 0.0 <= exact["accuracy"] <= 1.0 and exact["interval"][0] <= exact["accuracy"]
        assert 0.0 <= win["win_rate"] <= 1.0 and win["interval"][0] <= win["win_rate"] <= win["interval"][1]
        assert row["exact_match_vs_sft"]["over"] == "sft" and row["pairs"] > 0
        # the feedback judge scored every exact-match reply of the round (its model's and dSFT's), as in results.json;
        # how it orders right above wrong is there when both kinds of reply are, and for the round's model alone
        replies = [r for r in rows(run_dir / "rounds" / str(row["round"]) / "evaluate" / "exact_match") if r["reply"]]
        agreement, own = row["judge_agreement"], row["judge_agreement"]["policy"]
        assert agreement["n"] + agreement["judge_failures"] == len(replies) > 0, agreement
        results = json.loads((run_dir / "rounds" / str(row["round"]) / "evaluate" / "results.json").read_text())
        correct = {(r["model"], r["question_id"]): r["correct"] for r in replies}
        scored = [(j["model"], correct[(j["model"], j["prompt_id"])]) for j in rows(
            run_dir / "rounds" / str(row["round"]) / "evaluate" / "judge_agreement")
            if score_of(j, results["judge_agreement"]["score"]) is not None]
        assert len(scored) == agreement["n"]
        mixed = len({right for _, right in scored}) == 2
        assert (agreement["right_above_wrong"] is not None) == mixed, agreement
        assert agreement["right_above_wrong"] is None or 0.0 <= agreement["right_above_wrong"] <= 1.0
        policy_scored = [right for model, right in scored if model == f"round-{row['round']}"]
        assert (own["n"], own["right"]) == (len(policy_scored), sum(policy_scored)), own
        assert agreement["right_above_wrong"] == results["judge_agreement"]["right_above_wrong"]
        assert own == results["judge_agreement"]["by_model"][f"round-{row['round']}"]
    assert summary["sft_exact_match"]["n"] == 16
    # the dSFT model answers the same questions with the same seeds every time: each round takes its answers from
    # the recipe's own evaluation (which asked all 48 + 48; the rounds ask 8 + 16 of them) instead of an engine pass
    said = (run_dir / "rounds-said.log").read_text()
    for r in (1, 2):
        answers = rows(run_dir / "rounds" / str(r) / "evaluate" / "answers" / "sft")
        assert sorted(a["set"] for a in answers) == ["exact_match"] * 16 + ["pairwise"] * 8
        assert f"round {r}: the dSFT model's 24 answers are those of evaluate/answers/sft" in said, said
    assert (run_dir / "rounds" / "rounds.png").stat().st_size > 10_000
    report = write_report(run_dir, tmp_path / "report.html")
    section = rounds_html(run_dir)
    assert section in report.read_text()
    for row in summary["rounds"]:  # each round's last cell: how the judge ordered its replies, or why it cannot
        agreement = row["judge_agreement"]
        cell = (f"{agreement['right_above_wrong']:.0%}" if agreement["right_above_wrong"] is not None
                else f"- (all {agreement['n']} replies right, or all wrong)")
        (shown,) = re.findall(rf"<tr><td>{row['round']}</td>(?:<td>[^<]*</td>)*<td>([^<]*)</td></tr>", section)
        assert shown.startswith(cell), (shown, cell)
    images = render_page(report.as_uri(), tmp_path / "report.png")
    assert "Rounds" in [alt for alt, _ in images], images


def test_a_rerun_redoes_nothing(rounds_run):
    from zephyr_ray.run import run_recipe

    run_dir, _ = rounds_run
    before = (run_dir / "rounds" / "2" / "train_dpo" / "model" / "_SUCCESS").stat().st_mtime_ns
    manifest = run_recipe(run_dir / "recipe.yaml", run_dir)
    assert all(record["status"] == "skipped" for record in manifest["stages"].values()), manifest["stages"]
    assert (run_dir / "rounds" / "2" / "train_dpo" / "model" / "_SUCCESS").stat().st_mtime_ns == before


def test_the_dsft_answers_are_taken_only_where_they_were_asked_the_same_way(tiny_run, tiny_models, ray_local,
                                                                           tmp_path):
    """`rounds.reuse_sft_answers` on the demo's run: a round that would ask the dSFT model with more tokens, or
    another model in its place, takes none of the recipe's answers (and answers itself); asked the same way, round 1
    takes every one of its 48 exact-match and 48 pairwise answers, unchanged."""
    from zephyr_ray.config import DatasetSource, load_recipe
    from zephyr_ray.rounds import recipe_for_round, reuse_sft_answers

    run_dir = copy_of_tiny_run(tiny_run, tmp_path, stages=("train_sft", "evaluate"))
    recipe = load_recipe(REPO / "jobs" / "configs" / "tiny-cpu-rounds.yaml")  # the demo's evaluation, and rounds
    sft, prompts = str((run_dir / "train_sft" / "model").resolve()), DatasetSource(path="not read.jsonl")
    trained = str(run_dir.resolve() / "rounds" / "1" / "train_dpo" / "model")
    exact = recipe.evaluate.exact_match
    longer = recipe.model_copy(update={"evaluate": recipe.evaluate.model_copy(update={"exact_match": exact.model_copy(
        update={"sampling": exact.sampling.model_copy(update={"max_tokens": exact.sampling.max_tokens * 2})})})})
    answers = run_dir / "rounds" / "1" / "evaluate" / "answers" / "sft"
    assert reuse_sft_answers(recipe, recipe_for_round(longer, 1, prompts, sft, sft, trained), run_dir, 1) == 0
    other = str(tiny_models["student"])
    assert reuse_sft_answers(recipe, recipe_for_round(recipe, 1, prompts, other, other, trained), run_dir, 1) == 0
    assert not answers.exists()
    assert reuse_sft_answers(recipe, recipe_for_round(recipe, 1, prompts, sft, sft, trained), run_dir, 1) == 96
    key = lambda a: (a["set"], a["question_id"])  # noqa: E731
    taken = sorted(rows(answers), key=key)
    assert [a["set"] for a in taken] == ["exact_match"] * 48 + ["pairwise"] * 48
    assert taken == sorted((a for a in rows(run_dir / "evaluate" / "answers" / "sft") if a["set"] != "mt_bench"),
                           key=key)
