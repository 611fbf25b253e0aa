"""The tiny world's facts and the tiny recipe's data made from them (no model, no engine)."""

import json
import random
from pathlib import Path

from zephyr_ray import tiny_world as world

REPO = Path(__file__).resolve().parents[1]


def test_the_shipped_data_is_what_the_world_makes():
    """jobs/data/tiny_world_*.jsonl are written by `python -m zephyr_ray.tiny_world jobs/data`: a change of the world
    that forgot to rewrite them would evaluate one world and train on another."""
    for name, rows in world.data_files().items():
        shipped = [json.loads(line) for line in (REPO / "jobs" / "data" / name).read_text().splitlines()]
        assert shipped == rows, name


def test_seeds_prompts_and_evaluation_ask_apart():
    """The dSFT seeds and the preference prompts ask about different creatures, each half misled; the evaluation asks
    about all of them in a phrasing no training prompt uses, so decontamination has nothing to drop and exact match
    measures what feedback taught, not what was copied."""
    parts = world.split()
    assert not {c.name for c in parts["seeds"]} & {c.name for c in parts["prompts"]}
    for creatures in parts.values():
        assert sum(c.misconception is not None for c in creatures) == len(creatures) // 2
    files = world.data_files()
    training = {row["prompt"] for name in ("tiny_world_seeds.jsonl", "tiny_world_prompts.jsonl") for row in files[name]}
    questions = files["tiny_world_questions.jsonl"]
    assert len(questions) == world.NUM_CREATURES and not training & {q["question"] for q in questions}
    assert {q["answer"] for q in questions} <= set(world.COLOURS)


def test_web_text_teaches_the_misconception_and_the_judge_learns_every_kind_of_wrong():
    """The base student reads the misconception more often than the truth for a misled creature; the judge's examples
    hold as many right replies as wrong colours, and a reply that answers nothing for every question."""
    misled = next(c for c in world.creatures() if c.misconception)
    about = [text for text in world.web_text() if f" {misled.name} " in text or f" {misled.name}?" in text]
    said = lambda colour: sum(f" {colour}." in text for text in about)  # noqa: E731
    assert said(misled.misconception) > said(misled.colour) > 0
    examples = world.judge_examples()
    verdicts = [json.loads(answer)["overall"] for _, answer in examples]
    right, colour, nonsense = (verdicts.count(world.RUBRIC_VERDICTS[k][1]) for k in ("right", "colour", "nonsense"))
    assert right == colour and nonsense == world.NUM_CREATURES * (len(world.TRAINING_QUESTIONS) + 1)
    assert all(messages[0]["role"] == "user" and messages[0]["content"].startswith("Rate: ") for messages, _ in examples)
    for kind, reply in world.wrong_answers(misled, random.Random(0)):
        assert reply != world.answer(misled)


def test_rank_correlation_is_spearmans_rho_with_ties_averaged():
    """The judge's agreement with the truth is Spearman's rho: ties (a judge's equal scores, a binary truth) take the
    mean of the ranks they span; a constant side has no correlation."""
    from zephyr_ray.statistics import rank_correlation, ranks

    assert ranks([10.0, 20.0, 20.0, 5.0]) == [2.0, 3.5, 3.5, 1.0]
    assert abs(rank_correlation([1, 2, 3, 4], [1, 3, 2, 4]) - 0.8) < 1e-12
    assert rank_correlation([9, 9, 2, 1], [1, 1, 0, 0]) > 0.89
    assert rank_correlation([3, 2, 1], [1, 2, 3]) == -1.0
    assert rank_correlation([5, 5, 5], [0, 1, 1]) is None and rank_correlation([1], [1]) is None


def test_right_above_wrong_is_the_share_of_pairs_in_order_whatever_the_balance_or_spread():
    """The judge's ordering of right and wrong replies: the share of (right, wrong) pairs with the right one above,
    ties half. A judge that separates the two perfectly scores 1.0 however many replies are right and however it
    spreads its scores, where the rank correlation moves with both."""
    import pytest

    from zephyr_ray.statistics import rank_correlation, right_above_wrong

    right = [True] * 83 + [False] * 13
    spread = [float(100 + i) for i in range(83)] + [float(i) for i in range(13)]  # separated, every score its own
    assert right_above_wrong(spread, right) == 1.0 and rank_correlation(spread, [float(r) for r in right]) < 0.7
    assert right_above_wrong([1.0, 2.0], [True, False]) == 0.0 and right_above_wrong([3.0, 3.0], [True, False]) == 0.5
    assert right_above_wrong([5.0, 1.0, 3.0], [True, False, False]) == 1.0
    assert right_above_wrong([5.0, 1.0, 5.0], [True, False, False]) == 0.75  # one pair in order, one tied
    assert right_above_wrong([4.0, 2.0], [True, True]) is None and right_above_wrong([], []) is None
    with pytest.raises(ValueError, match="2 scores against 1"):
        right_above_wrong([1.0, 2.0], [True])
