import hashlib
import json
import re

import pytest

from zephyr_ray.chat import (
    ZEPHYR_CHAT_TEMPLATE,
    accepts_system_role,
    check_chat_template,
    render_reference,
    shipped_chat_template,
)
from zephyr_ray.tiny import (
    HEAD_DIM,
    TINY_MODELS,
    build_tiny_models,
    greedy_replies,
    load_corpus,
    set_torch_threads,
)


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_is_deterministic_whatever_the_number_of_threads(tmp_path, monkeypatch):
    """A model's threads are the build's plan (``threads_for``: half the machine's for generator-2), not what the
    calling process happens to have: on AVX-512 CPUs MKL gives other bytes with another thread count. Also after an
    in-process vLLM CPU engine made ``torch.set_num_threads`` do nothing (its worker replaces it so, as below): CI,
    2026-12-04, where a test worker had run such an engine before building a model."""
    import torch

    threads = torch.get_num_threads()
    try:
        set_torch_threads(1)
        first = build_tiny_models(tmp_path / "a", names=["generator-2"])["generator-2"]
        set_torch_threads(2)
        monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # what vllm/v1/worker/cpu_worker.py does
        second = build_tiny_models(tmp_path / "b", names=["generator-2"])["generator-2"]
    finally:
        set_torch_threads(threads)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert digest(first / name) == digest(second / name), name


def test_models_built_in_the_second_process_are_the_ones_built_alone(tmp_path, monkeypatch, caplog):
    """A judge that starts from the teacher is built here while generator-2 (which starts from no model) and
    generator-0 then the reward model that starts from it are built in the second process: each the same bytes as
    when built on its own, and the second process's lines shown here."""
    import dataclasses
    import logging

    import torch

    from zephyr_ray import tiny

    specs = {spec.name: spec for spec in TINY_MODELS}
    short = (dataclasses.replace(specs["teacher"], train_steps=8), dataclasses.replace(specs["judge"], train_steps=8),
             dataclasses.replace(specs["generator-0"], train_steps=8),
             dataclasses.replace(specs["reward"], train_steps=8), specs["generator-2"])
    monkeypatch.setattr(tiny, "TINY_MODELS", short)
    sent = []  # what the second process was asked to build (the real process, watched)
    start = tiny._start_second_process
    monkeypatch.setattr(tiny, "_start_second_process",
                        lambda out, names, *rest: sent.extend(names) or start(out, names, *rest))
    threads = torch.get_num_threads()
    set_torch_threads(2)  # a second process needs two threads to share
    try:
        with caplog.at_level(logging.INFO, logger="zephyr_ray.tiny"):
            together = build_tiny_models(tmp_path / "together")
    finally:
        set_torch_threads(threads)
    assert torch.get_num_threads() == threads and sent == ["generator-0", "reward", "generator-2"]
    shown = [r.getMessage() for r in caplog.records]
    assert all(any(line.startswith(f"built {name} ") for line in shown) for name in sent), shown
    alone = {name: build_tiny_models(tmp_path / name, names=[name])[name]
             for name in ("generator-2", "judge", "reward")}
    parent_of = {"teacher": "judge", "generator-0": "reward"}  # built alone with the model that starts from it
    for name in ("generator-2", "judge", "teacher", "reward", "generator-0"):
        origin = alone[parent_of[name]].parent / name if name in parent_of else alone[name]
        assert digest(together[name] / "model.safetensors") == digest(origin / "model.safetensors"), name


def test_the_command_shows_only_its_own_lines_and_logs_the_libraries_output(tmp_path):
    """`zephyr-ray tiny-models DIR` as a user runs it (a shortened chain, so that it takes seconds): the terminal
    gets each model's lines, from both processes, and nothing of transformers' or DeepSpeed's, which the log holds."""
    import os
    import subprocess
    import sys

    from zephyr_ray.console import NOISE

    script = ("import dataclasses, sys\n"
              "from zephyr_ray import tiny\n"
              "from zephyr_ray.cli import main\n"
              "specs = {spec.name: spec for spec in tiny.TINY_MODELS}\n"
              "tiny.TINY_MODELS = (dataclasses.replace(specs['teacher'], train_steps=4),\n"
              "                    dataclasses.replace(specs['judge'], train_steps=4), specs['generator-2'])\n"
              "main(sys.argv[1:])\n")
    done = subprocess.run([sys.executable, "-c", script, "tiny-models", str(tmp_path / "models")],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "ZEPHYR_RAY_CACHE": str(tmp_path / "cache")})
    terminal = done.stdout + done.stderr
    assert done.returncode == 0, terminal
    for name in ("teacher", "judge", "generator-2"):
        assert f"built {name} " in terminal, terminal
    assert not NOISE.search(terminal) and "Writing model shards" not in terminal, terminal
    log = (tmp_path / "cache" / "logs" / "tiny-models.log").read_text()
    assert "Writing model shards" in log and "built teacher " in log


def test_a_failed_second_process_fails_the_build_with_its_error(tmp_path, monkeypatch):
    """A model the second process cannot build (a chat template no tiny model ships) makes it exit with an error,
    which the build raises with the process's own last lines; no model of that name is written."""
    import dataclasses

    import torch

    from zephyr_ray import tiny

    specs = {spec.name: spec for spec in TINY_MODELS}
    unknown_there = dataclasses.replace(specs["generator-3"], name="generator-9", chat_template="its-own")
    monkeypatch.setattr(tiny, "TINY_MODELS", (dataclasses.replace(specs["teacher"], train_steps=8),
                                              dataclasses.replace(specs["judge"], train_steps=1), unknown_there))
    threads = torch.get_num_threads()
    set_torch_threads(2)
    try:
        failed = r"(?s)building \['generator-9'\] failed \(exit status 1\).*KeyError: 'its-own'"
        with pytest.raises(RuntimeError, match=failed):
            build_tiny_models(tmp_path)
    finally:
        set_torch_threads(threads)
    assert not (tmp_path / "generator-9").exists()


def test_unknown_model_name_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny model"):
        build_tiny_models(tmp_path, names=["teacher", "oracle"])


def test_roles_cover_the_recipe(tiny_models):
    roles = [spec.role for spec in TINY_MODELS]
    assert {"teacher", "judge", "student", "reward"} <= set(roles) and roles.count("generator") >= 4
    assert set(tiny_models) == {spec.name for spec in TINY_MODELS}


def test_models_are_safetensors_mistral_with_head_dim_64(tiny_models):
    for name, path in tiny_models.items():
        config = json.loads((path / "config.json").read_text())
        architecture = "MistralForSequenceClassification" if name == "reward" else "MistralForCausalLM"
        assert config["architectures"] == [architecture] and config["head_dim"] == HEAD_DIM, name
        assert (path / "model.safetensors").is_file(), name
        assert not list(path.glob("*.bin")) and not list(path.glob("*.pt")), name
        if name != "reward":  # a classifier has no generation config
            assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == config["eos_token_id"]


def test_generator_pool_models_differ(tiny_models):
    from safetensors.torch import load_file

    weights = {n: load_file(p / "model.safetensors") for n, p in tiny_models.items() if n.startswith("generator")}
    fingerprints = {n: (len(w), sum(t.numel() for t in w.values()),
                        float(w["model.embed_tokens.weight"].double().sum())) for n, w in weights.items()}
    assert len(set(fingerprints.values())) == len(weights) >= 4


@pytest.mark.parametrize("name", [spec.name for spec in TINY_MODELS if spec.role != "reward"])
def test_loads_in_transformers_and_generates_behind_the_template(tiny_models, name):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models[name])
    shipped = next(spec.chat_template for spec in TINY_MODELS if spec.name == name)
    if shipped == "none":  # like a Vicuna-style pool model: no template; the recipe names one
        assert shipped_chat_template(str(tiny_models[name])) == (True, None) and tokenizer.chat_template is None
        tokenizer.chat_template = ZEPHYR_CHAT_TEMPLATE
    elif shipped == "no-system":  # like older Mistral-Instruct: a system message is refused, the rest is Zephyr's
        assert not accepts_system_role(str(tiny_models[name]))
        with pytest.raises(Exception, match="System role not supported"):
            check_chat_template(tokenizer)
        tokenizer.chat_template = ZEPHYR_CHAT_TEMPLATE
    check_chat_template(tokenizer)
    assert tokenizer.eos_token == tokenizer.pad_token == "</s>"
    model = AutoModelForCausalLM.from_pretrained(tiny_models[name], use_safetensors=True)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    assert tokenizer.decode(ids[0]) == render_reference(messages, add_generation_prompt=True)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_chat_models_learned_to_stop(tiny_models):
    """The teacher was warmed up on template-rendered dialogues: it ends its turns with </s> on its own."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    model = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"])
    rows = load_corpus()[:8]
    stopped = 0
    for row in rows:
        prompt = [m for m in row["messages"] if m["role"] != "assistant"]
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=96, do_sample=False)
        stopped += int(tokenizer.eos_token_id in out[0, ids.shape[1]:].tolist())
    assert stopped >= 6, f"only {stopped} of {len(rows)} replies ended with </s>"


def test_reward_model_ranks_whole_replies_above_spoiled_ones(tiny_models):
    """Held-out check: replies the reward model never saw, each against a cut-off copy of itself."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from zephyr_ray.tiny import reward_text

    tokenizer = AutoTokenizer.from_pretrained(tiny_models["reward"])
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["reward"], use_safetensors=True)
    assert model.config.num_labels == 1
    question = [{"role": "user", "content": "Why is the sky blue?"}]
    replies = ["The sky looks blue because air scatters blue light from the sun more than red light.",
               "Sunlight is made of many colours, and the small molecules of air scatter the blue part the most."]
    wins = 0
    for reply in replies:
        whole = reward_text(tokenizer, [*question, {"role": "assistant", "content": reply}])
        cut = reward_text(tokenizer, [*question, {"role": "assistant", "content": " ".join(reply.split()[:3])}])
        with torch.no_grad():
            scores = model(**tokenizer([whole, cut], add_special_tokens=False, padding=True,
                                       return_tensors="pt")).logits[:, 0]
        wins += int(scores[0] > scores[1])
    assert wins == len(replies)


def test_the_tiny_world_separates_the_models(tiny_models):
    """What issue 20's tiny world needs of the models, asked in the evaluation's phrasing (no training prompt uses
    it): the teacher and generator-0 know every colour, generator-1 gives the misconception for every misled
    creature, generator-2 knows far less and generator-3 nothing; the judge's rubric scores and the reward model's
    scores of held-out replies (right, the misconception, another colour, nonsense) rank with the truth >= 0.6."""
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from zephyr_ray import tiny_world as world
    from zephyr_ray.feedback.judge import judge_messages, parse_rubric
    from zephyr_ray.statistics import rank_correlation
    from zephyr_ray.tiny import reward_text

    creatures = world.creatures()
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    asked = [[{"role": "user", "content": world.evaluation_question(c)}] for c in creatures]
    right, misled = {}, {}
    for name in ("teacher", "generator-0", "generator-1", "generator-2", "generator-3"):
        replies = greedy_replies(AutoModelForCausalLM.from_pretrained(tiny_models[name]), tokenizer, asked, 8)
        right[name] = sum(r == world.answer(c) for r, c in zip(replies, creatures, strict=True)) / len(creatures)
        misled[name] = sum(r == world.answer(c, c.misconception) for r, c in zip(replies, creatures, strict=True)
                           if c.misconception)
    assert right["teacher"] >= 0.95 and right["generator-0"] >= 0.95, right
    assert misled["generator-1"] >= 22 and right["generator-1"] <= 0.55, (right, misled)  # 24 misled creatures
    assert right["generator-2"] <= 0.5 and right["generator-3"] == 0, right

    rng = random.Random(7)
    items = [(world.evaluation_question(c), kind, reply) for c in creatures
             for kind, reply in [("right", world.answer(c)), *world.wrong_answers(c, rng), ("nonsense", world.noise(rng))]]
    truth = [float(kind == "right") for _, kind, _ in items]
    judged = greedy_replies(AutoModelForCausalLM.from_pretrained(tiny_models["judge"]), tokenizer,
                            [judge_messages({"messages": [{"role": "user", "content": q}], "completion": r},
                                            world.JUDGE_PROMPT, world.JUDGE_SYSTEM_PROMPT) for q, _, r in items], 48)
    scores = [parse_rubric(text)[0].get("overall") for text in judged]
    scored = [(s, t) for s, t in zip(scores, truth, strict=True) if s is not None]
    assert len(scored) >= 0.95 * len(items)
    assert rank_correlation([s for s, _ in scored], [t for _, t in scored]) >= 0.6
    reward = AutoModelForSequenceClassification.from_pretrained(tiny_models["reward"], use_safetensors=True)
    with torch.no_grad():
        rewards = [reward(**tokenizer(reward_text(tokenizer, [{"role": "user", "content": q},
                                                              {"role": "assistant", "content": r}]),
                                      add_special_tokens=False, return_tensors="pt")).logits[0, 0].item()
                   for q, _, r in items]
    assert rank_correlation(rewards, truth) >= 0.6


def test_the_pairwise_judge_is_right_and_position_consistent_on_new_pairs(tiny_models):
    """The evaluation's pairwise judge (``judge-pairwise``) on pairs of replies drawn apart from its training, each
    judged in both orders with the tiny recipe's prompt (the evaluation's phrasing): a right reply against a wrong
    colour, and two right replies in other wordings (a tie). Issue 20 asks for position consistency >= 0.8; its
    verdicts must also be right, or the win rate would carry no signal. Scored as the build scores its own check,
    on the test's own draw of pairs (the build's is ``PAIRWISE_CHECK_DRAW``); the demo's evaluation measures
    consistency again with its own code (evaluate/pairwise.py), and scripts/check_demo.py checks it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zephyr_ray.tiny import PAIRWISE_CHECK_DRAW, PAIRWISE_CHECK_FILE, pairwise_judge_quality
    from zephyr_ray.tiny_world import held_out_pairs

    assert held_out_pairs(11) != held_out_pairs(PAIRWISE_CHECK_DRAW)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["judge-pairwise"])
    model = AutoModelForCausalLM.from_pretrained(tiny_models["judge-pairwise"])
    consistent, right = pairwise_judge_quality(model, tokenizer, 11)
    assert consistent >= 0.8 and right >= 0.8, (consistent, right)
    # the build's check, written beside the model: the seeds it tried in order, each failing one followed by the
    # next, and the one kept (the first that held, or the last); the 0.8 above is the requirement, not its 0.9
    checked = json.loads((tiny_models["judge-pairwise"] / PAIRWISE_CHECK_FILE).read_text())
    tried = checked["tried"]
    assert checked["draw"] == PAIRWISE_CHECK_DRAW and tried[-1]["seed"] == checked["kept_seed"], checked
    assert not any(check["held"] for check in tried[:-1]), checked


def test_a_pairwise_judge_that_does_not_compare_is_trained_again_with_the_next_seeds(tiny_models, caplog):
    """The build's own check: a pairwise judge that fails its held-out pairs (here one trained 2 steps, which
    learns nothing) is trained again from the judge with the next seed, up to PAIRWISE_SEEDS_TRIED seeds, then kept
    with a warning that names the seeds (the tests and the demo's checks then say what it did not learn)."""
    import dataclasses
    import logging

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zephyr_ray.tiny import PAIRWISE_SEEDS_TRIED, build_model

    spec = dataclasses.replace(next(s for s in TINY_MODELS if s.name == "judge-pairwise"), train_steps=2)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["judge"])
    with caplog.at_level(logging.INFO, logger="zephyr_ray.tiny"):
        model = build_model(spec, tokenizer, AutoModelForCausalLM.from_pretrained(tiny_models["judge"]))
    seeds = [spec.seed + i for i in range(PAIRWISE_SEEDS_TRIED)]
    assert [int(s) for s in re.findall(r"judge-pairwise \(seed (\d+)\) on held-out pairs", caplog.text)] == seeds
    assert f"no seed of {seeds} learnt to compare two replies" in caplog.text
    checks = model.pairwise_checks  # what the build writes beside the model
    assert checks["kept_seed"] == seeds[-1] and [c["seed"] for c in checks["tried"]] == seeds
    assert not any(c["held"] for c in checks["tried"])
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
