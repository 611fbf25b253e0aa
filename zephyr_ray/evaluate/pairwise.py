"""The pairwise win rate: per instruction 1 (win), 0.5 (tie) or 0 (loss), averaged over both orders; its bootstrap
interval, the length view (per length-difference bin and length-controlled) and the judge's position bias."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from ..statistics import bootstrap_interval, mean
from .grading import unanswered


def length_controlled(scores: list[float], length_differences: list[float], ridge: float = 1e-3) -> float:
    """The win rate at zero length difference: logistic fit of the score on tanh(length difference / its std)
    (AlpacaEval 2's length term; its instruction-difficulty term needs many models and is left out)."""
    import numpy as np

    y = np.asarray(scores, dtype=float)
    d = np.asarray(length_differences, dtype=float)
    x = np.tanh(d / (d.std() or 1.0))
    features = np.stack([np.ones_like(x), x], axis=1)
    weights = np.zeros(2)
    for _ in range(50):  # Newton's method on the ridge-penalised cross-entropy (soft labels: ties are 0.5)
        p = 1 / (1 + np.exp(-features @ weights))
        gradient = features.T @ (p - y) + ridge * weights
        hessian = features.T @ (features * (p * (1 - p))[:, None]) + ridge * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        weights -= step
        if np.abs(step).max() < 1e-9:
            break
    return float(1 / (1 + math.exp(-weights[0])))



def length_controlled_interval(scores: list[float], length_differences: list[float], samples: int,
                               confidence: float, seed: int = 0) -> list[float]:
    """Percentile bootstrap over instructions of the length-controlled win rate (the fit redone on each resample)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(scores), (min(samples, 1000), len(scores)))
    fits = [length_controlled([scores[i] for i in pick], [length_differences[i] for i in pick]) for pick in picks]
    tail = (1 - confidence) / 2 * 100
    return [float(np.percentile(fits, tail)), float(np.percentile(fits, 100 - tail))]



LENGTH_BINS = (("model shorter by >10%", -math.inf, -0.1), ("within 10%", -0.1, 0.1),
               ("model longer by >10%", 0.1, math.inf))



def pairwise_results(judgments: list[dict[str, Any]], samples: int, confidence: float) -> dict[str, Any] | None:
    """Win rate over instructions (both orders averaged), its interval, the length view and the judge's bias."""
    rows = [j for j in judgments if j["set"] == "pairwise"]
    if not rows:
        return None
    by_instruction: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_instruction[row["question_id"]].append(row)
    points = {"model": 1.0, "tie": 0.5, "opponent": 0.0}
    scores, differences, consistent, judged_both, first_preferred, decided = [], [], 0, 0, 0, 0
    for _, pair in sorted(by_instruction.items()):  # intervals: the same whatever order the judgments came in
        verdicts = [j for j in pair if j["verdict"] is not None]
        if not verdicts:
            continue
        scores.append(sum(points[j["verdict"]] for j in verdicts) / len(verdicts))
        differences.append((pair[0]["model_chars"] - pair[0]["opponent_chars"]) / max(pair[0]["opponent_chars"], 1))
        if len(verdicts) == 2:
            judged_both += 1
            consistent += verdicts[0]["verdict"] == verdicts[1]["verdict"]
        for j in verdicts:
            if j["verdict"] != "tie":
                decided += 1
                first_preferred += (j["verdict"] == "model") == (j["order"] == "model_first")
    result: dict[str, Any] = {
        "model": rows[0]["model"], "opponent": rows[0]["opponent"], "instructions": len(by_instruction),
        "compared": len(scores), "judgments": len(rows),
        # a judgment is missing because an answer is (a failed generation: not the judge's doing), or the judge's
        # answer had no verdict
        "unanswered": sum(1 for j in rows if unanswered(j)),
        "judge_failures": sum(1 for j in rows if j["verdict"] is None and not unanswered(j)),
        "wins": sum(s > 0.5 for s in scores), "ties": sum(s == 0.5 for s in scores),
        "losses": sum(s < 0.5 for s in scores),
        "position_consistency": consistent / judged_both if judged_both else None,
        "first_position_preference": first_preferred / decided if decided else None,
        "confidence": confidence,
    }
    if not scores:
        return result | {"win_rate": None, "interval": None, "length_controlled_win_rate": None, "length_bins": []}
    result["win_rate"] = sum(scores) / len(scores)
    result["interval"] = list(bootstrap_interval(scores, samples, confidence))
    result["length_controlled_win_rate"] = length_controlled(scores, differences)
    result["length_controlled_interval"] = length_controlled_interval(scores, differences, samples, confidence)
    result["length_bins"] = [
        {"bin": name, "instructions": len(chosen), "win_rate": mean(chosen)}
        for name, low, high in LENGTH_BINS
        for chosen in [[s for s, d in zip(scores, differences, strict=True) if low <= d < high]]]
    return result
