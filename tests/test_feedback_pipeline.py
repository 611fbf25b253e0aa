"""The data half of the recipe on the tiny models with real vLLM engines on Ray Data:
synthesize -> complete (4 models) -> judge (rubric with structured outputs, and logprob) -> binarize -> one DPO step."""

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from zephyr_ray.config import load_recipe
from zephyr_ray.data import PreferenceRow, prompt_id_of
from zephyr_ray.feedback.complete import PRINCIPLES
from zephyr_ray.feedback.judge import ASPECTS
from zephyr_ray.stages import run_stage

REPO = Path(__file__).resolve().parents[1]
# the module fixture runs the whole data half (~13 min on 2 idle cores): more than the suite's per-test limit
pytestmark = [pytest.mark.engine, pytest.mark.timeout(2400)]


def rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def tiny_recipe(tmp: Path, tiny_models: dict, **changes) -> Path:
    """tiny-cpu.yaml with the model paths pointing at the test's tiny models."""
    text = (REPO / "jobs" / "configs" / "tiny-cpu.yaml").read_text()
    text = text.replace("./artifacts/tiny-models", str(tiny_models["teacher"].parent))
    text = text.replace("./jobs/data", str(REPO / "jobs" / "data"))
    data = yaml.safe_load(text)
    for section, values in changes.items():
        data[section].update(values)
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def pipeline(tiny_models, ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("feedback")
    recipe = load_recipe(tiny_recipe(tmp, tiny_models))
    run_dir = tmp / "run"
    results = {name: run_stage(name, recipe, run_dir) for name in ("synthesize", "complete", "judge", "binarize")}
    return recipe, run_dir, results


def test_synthesize_writes_ultrachat_dialogues_and_counts_drops(pipeline):
    recipe, run_dir, results = pipeline
    seeds = results["synthesize"].counts["seeds"]
    dialogues = rows(run_dir / "synthesize" / "dialogues")
    rejects = rows(run_dir / "synthesize" / "rejects")
    assert len(dialogues) + len(rejects) == seeds["accepted"] == 16
    assert len(dialogues) > 0
    assert sum(results["synthesize"].counts["reasons"].values()) == len(rejects)
    for row in dialogues:
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant"] * recipe.synthesize.num_turns
        assert row["prompt"] == row["messages"][0]["content"] and row["prompt_id"] == prompt_id_of(row["prompt"])
        assert all(m["content"].strip() for m in row["messages"])
    assert all(r["reason"] for r in rejects)


def test_every_prompt_gets_one_completion_per_pool_model(pipeline):
    recipe, run_dir, results = pipeline
    prompts = results["complete"].counts["prompts"]["accepted"]
    by_prompt: dict[str, list[str]] = {}
    for model in recipe.complete.models:
        for row in rows(run_dir / "complete" / "models" / model.name):
            by_prompt.setdefault(row["prompt_id"], []).append(row["model"])
            assert row["principle"] in PRINCIPLES and row["messages"][0]["content"] == PRINCIPLES[row["principle"]]
            params = json.loads(row["sampling_params"])
            assert params["max_tokens"] == model.sampling.max_tokens and params["seed"] is not None
            assert row["finish_reason"] in ("stop", "length") and row["num_prompt_tokens"] > 0
    assert len(by_prompt) == prompts
    assert set(results["complete"].tokens_per_second) == {m.name for m in recipe.complete.models}
    assert all(rate > 0 for rate in results["complete"].tokens_per_second.values())
    assert all(sorted(models) == sorted(m.name for m in recipe.complete.models) for models in by_prompt.values())


def test_rubric_judge_scores_or_explains_every_completion(pipeline):
    recipe, run_dir, results = pipeline
    judgments = rows(run_dir / "judge" / "judgments")
    assert len(judgments) == sum(results["complete"].counts[m.name] for m in recipe.complete.models)
    errors = 0
    for row in judgments:
        assert row["raw_judgment"] is not None or row["judge_error"].startswith("not judged")
        if row["judge_error"] is None:
            assert all(1 <= row[a] <= 5 for a in ASPECTS) and 1 <= row["overall"] <= 10
        else:
            errors += 1
    assert errors == results["judge"].counts["judge_errors"]
    assert errors < len(judgments) / 2, "structured outputs should make most judgments parse"


def check_preferences(run_dir: Path, n_prompts: int) -> list[dict]:
    pairs = rows(run_dir / "binarize" / "preferences")
    rejects = rows(run_dir / "binarize" / "rejects")
    assert len(pairs) + len(rejects) == n_prompts
    assert len(pairs) > 0
    for pair in pairs:
        PreferenceRow.model_validate(pair)
        assert pair["score_chosen"] > pair["score_rejected"]
        assert pair["prompt_id"] == prompt_id_of(pair["prompt"])
        assert pair["chosen"][0] == pair["rejected"][0] == {"role": "user", "content": pair["prompt"]}
        assert pair["messages"] == pair["chosen"] and pair["chosen_model"] != pair["rejected_model"]
    assert all(r["reason"] for r in rejects)
    return pairs


def test_binarize_makes_valid_pairs_and_stats(pipeline):
    recipe, run_dir, results = pipeline
    check_preferences(run_dir, results["complete"].counts["prompts"]["accepted"])
    stats = json.loads((run_dir / "binarize" / "stats.json").read_text())
    assert set(stats["score_histograms"]) == {m.name for m in recipe.complete.models}
    assert sum(stats["wins"].values()) == stats["pairs"] == results["binarize"].counts["pairs"]
    assert 0.0 <= stats["fraction_chosen_longer"] <= 1.0
    assert (run_dir / "binarize" / "stats.png").stat().st_size > 10_000


def test_logprob_judge_on_the_same_completions(pipeline, tiny_models, tmp_path):
    _, run_dir, results = pipeline
    recipe = load_recipe(tiny_recipe(tmp_path, tiny_models, judge={"kind": "logprob"}, binarize={"score": "overall"}))
    other = tmp_path / "run"
    shutil.copytree(run_dir / "complete", other / "complete")
    run_stage("judge", recipe, other)
    judgments = rows(other / "judge" / "judgments")
    judgeable = [r for r in judgments if not (r["judge_error"] or "").startswith("not judged")]
    scored = [r for r in judgeable if r["judge_error"] is None]
    assert len(scored) >= len(judgeable) * 0.9 and len(judgeable) >= len(judgments) / 2
    assert all(1.0 <= r["overall"] <= 5.0 and r["raw_judgment"] in "12345" for r in scored)
    assert len({round(r["overall"], 6) for r in scored}) > len(scored) // 2, "expected continuous scores"
    run_stage("binarize", recipe, other)
    check_preferences(other, results["complete"].counts["prompts"]["accepted"])


def test_preferences_load_with_datasets_and_train_a_dpo_step(pipeline, tiny_models, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    _, run_dir, _ = pipeline
    dataset = datasets.load_dataset("parquet", data_files=str(run_dir / "binarize" / "preferences" / "*.parquet"),
                                    split="train")
    assert {"prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen", "score_rejected"} <= set(
        dataset.column_names)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["student"])
    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=2, max_steps=1, report_to=[],
                     bf16=False, use_cpu=True, max_length=256, logging_steps=1, save_strategy="no")
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset.select_columns(["chosen", "rejected"]),
                         processing_class=tokenizer)
    output = trainer.train()
    assert output.global_step == 1 and output.training_loss > 0


def test_rerun_skips_finished_work_and_redoes_a_lost_model_identically(pipeline):
    recipe, run_dir, _ = pipeline
    lost = run_dir / "complete" / "models" / "generator-1"
    before = sorted(rows(lost), key=lambda r: r["prompt_id"])
    shutil.rmtree(lost)
    (lost.parent / ".generator-1.tmp-deadbeef").mkdir()  # what a crash mid-write leaves
    result = run_stage("complete", recipe, run_dir)
    assert result.outputs.keys() == {"generator-1"}, "only the lost model is generated again"
    assert sorted(rows(lost), key=lambda r: r["prompt_id"]) == before
    assert not list(lost.parent.glob(".generator-1.tmp-*"))
    assert run_stage("judge", recipe, run_dir).skipped and run_stage("binarize", recipe, run_dir).skipped


def test_stage_numbers_reach_the_ray_metrics_endpoint(pipeline, ray_local, tmp_path):
    """Ray exports a gauge around the time it is set, so the stage runs here, just before the scrape."""
    import re
    import time
    import urllib.request

    recipe, run_dir, _ = pipeline
    shutil.copytree(run_dir / "judge", tmp_path / "judge")
    pairs = run_stage("binarize", recipe, tmp_path).counts["pairs"]
    wanted = re.compile(r'^ray_zephyr_stage_count\{[^}]*key="pairs"[^}]*stage="binarize"[^}]*\} (\S+)$', re.M)
    deadline = time.time() + 60
    while time.time() < deadline:
        body = urllib.request.urlopen(ray_local.metrics_url, timeout=10).read().decode()
        found = wanted.search(body)
        if found:
            assert float(found.group(1)) == pairs
            assert re.search(r'^ray_zephyr_stage_seconds\{[^}]*stage="binarize"', body, re.M)
            return
        time.sleep(2)
    raise AssertionError("binarize's pair count never reached the Ray metrics endpoint")
