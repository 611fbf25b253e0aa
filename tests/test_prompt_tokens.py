"""One prompt-token path: a conversation becomes the same token ids in training (TRL), Ray Data generation,
evaluation and Serve, with one BOS for a tokenizer that adds one (the tiny student, like Mistral's) and none for a
tokenizer that does not (the tiny teacher). The template writes the BOS (``chat.prompt_template``) and every path
encodes the rendered text without special tokens."""

import shutil

import pytest
from conftest import REPO, free_port

pytestmark = pytest.mark.engine

CONVERSATION = [{"role": "system", "content": "Answer in one sentence."},
                {"role": "user", "content": "How do bees make honey?"}]


def trl_prompt_ids(model: str, tokenizer, out_dir) -> list[int]:
    """The prompt ids TRL's DPOTrainer trains on for a pair after CONVERSATION (its own tokenization)."""
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    pair = {"chosen": [*CONVERSATION, {"role": "assistant", "content": "They dry nectar."}],
            "rejected": [*CONVERSATION, {"role": "assistant", "content": "Bees are birds."}]}
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model), processing_class=tokenizer,
                         args=DPOConfig(output_dir=str(out_dir), report_to=[], use_cpu=True),
                         train_dataset=datasets.Dataset.from_list([pair]))
    return list(trainer.train_dataset[0]["prompt_ids"])


def test_a_conversation_has_the_same_prompt_ids_in_training_generation_evaluation_and_serve(ray_local, tiny_models,
                                                                                            tmp_path):
    """Training: TRL's DPOTrainer with the training stages' tokenizer. Generation: the ids vLLM ran on in a Ray Data
    pass of the base model with the recipe's template (as synthesize and complete run it). Evaluation: the ids the
    same preprocess gives a trained model's engine (rendered with the template training saved with it). Serve: the
    ids vLLM reports through the OpenAI client, for the trained student and for the teacher with its own template."""
    import ray.data
    from openai import OpenAI
    from ray import serve

    from zephyr_ray.chat import tokenizer_of
    from zephyr_ray.config import Engine, Hardware, ServeConfig, ServedModel, load_recipe
    from zephyr_ray.generate import generate, prompt_tokens_of
    from zephyr_ray.serving import APP_NAME, serve_locally
    from zephyr_ray.train.loop import load_tokenizer

    hardware = Hardware(accelerator="cpu", num_workers=1)
    recipe = load_recipe(REPO / "jobs" / "configs" / "tiny-cpu.yaml")
    settings = {"max_model_len": 512, "kv_cache_gib": 0.5}
    ids: dict[str, dict[str, list[int]]] = {}
    trained: dict[str, str] = {}
    names = ("student", "teacher")
    # both base models' engines side by side in one Ray Data execution, as complete runs its pool models
    passes = [generate(ray.data.from_items([{"name": name, "messages": CONVERSATION,
                                             "sampling_params": {"max_tokens": 1, "temperature": 0.0}}]),
                       Engine(model=str(tiny_models[name]), chat_template="zephyr", **settings), hardware,
                       sharing=len(names), keep_prompt_token_ids=True) for name in names]
    generated = {row["name"]: row["prompt_token_ids"] for row in passes[0].union(*passes[1:]).take_all()}
    for name in names:
        base = str(tiny_models[name])
        tokenizer = load_tokenizer(base, recipe.train_dpo)
        ids[name] = {"training": trl_prompt_ids(base, tokenizer, tmp_path / name), "generation": generated[name]}

        trained[name] = str(tmp_path / f"{name}-trained")  # what a training stage exports: weights, its tokenizer
        shutil.copytree(base, trained[name])
        tokenizer.save_pretrained(trained[name])
        preprocess = prompt_tokens_of(Engine(model=trained[name], **settings))  # what evaluate's engine is fed
        ids[name]["evaluation"] = preprocess({"messages": CONVERSATION})["tokenized_prompt"]

    config = ServeConfig(models=[ServedModel(model_id="student", model=trained["student"], **settings),
                                 ServedModel(model_id="teacher", model=str(tiny_models["teacher"]),
                                             chat_template="zephyr", **settings)],
                         api_key_env="ZEPHYR_RAY_NO_SUCH_KEY")
    url = serve_locally(config, hardware, port=free_port())
    try:
        api = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        for name in ids:
            reply = api.chat.completions.create(model=name, messages=CONVERSATION, max_tokens=1,
                                                extra_body={"return_token_ids": True})
            ids[name]["serve"] = reply.model_extra["prompt_token_ids"]
    finally:
        serve.delete(APP_NAME)
        serve.shutdown()

    bos = tokenizer_of(str(tiny_models["student"])).bos_token_id
    for name, paths in ids.items():
        assert len({tuple(v) for v in paths.values()}) == 1, (name, paths)
    assert ids["student"]["training"][0] == bos and ids["student"]["training"].count(bos) == 1
    assert bos not in ids["teacher"]["training"]
