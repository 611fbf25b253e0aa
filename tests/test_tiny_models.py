import hashlib
import json

import pytest

from zephyr_ray.chat import (
    ZEPHYR_CHAT_TEMPLATE,
    accepts_system_role,
    check_chat_template,
    render_reference,
    shipped_chat_template,
)
from zephyr_ray.tiny import HEAD_DIM, TINY_MODELS, build_tiny_models, load_corpus


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_build_is_deterministic(tmp_path):
    first = build_tiny_models(tmp_path / "a", names=["generator-2"])["generator-2"]
    second = build_tiny_models(tmp_path / "b", names=["generator-2"])["generator-2"]
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert digest(first / name) == digest(second / name), name


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
