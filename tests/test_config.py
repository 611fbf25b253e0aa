import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from zephyr_ray.chat import ZEPHYR_CHAT_TEMPLATE, template_text
from zephyr_ray.config import RecipeError, derive_batch, load_recipe

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "jobs" / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    return err.value.problems


def test_zephyr_recipe_has_the_paper_settings():
    recipe = load_recipe(CONFIGS / "zephyr-7b.yaml")
    sft, dpo = recipe.train_sft, recipe.train_dpo
    assert recipe.hardware.accelerator == "gpu" and recipe.hardware.num_workers == 16
    assert sft.model == "mistralai/Mistral-7B-v0.1"
    assert (sft.learning_rate, sft.lr_scheduler_type, sft.warmup_ratio) == (2e-5, "cosine", 0.1)
    assert (sft.global_batch_size, sft.num_epochs, sft.max_length, sft.packing) == (512, 1, 2048, True)
    assert (dpo.learning_rate, dpo.lr_scheduler_type, dpo.warmup_ratio) == (5e-7, "linear", 0.1)
    assert (dpo.global_batch_size, dpo.beta, dpo.num_epochs) == (32, 0.1, 3)
    assert sft.zero_stage == dpo.zero_stage == 3 and sft.bf16 and dpo.bf16
    assert len(recipe.complete.models) == 4 and recipe.binarize.rejected == "random"


def test_tiny_recipe_loads_for_cpu():
    recipe = load_recipe(CONFIGS / "tiny-cpu.yaml")
    assert recipe.hardware.accelerator == "cpu" and recipe.hardware.num_workers == 2
    assert not recipe.train_sft.bf16 and len(recipe.complete.models) == 4


@pytest.mark.parametrize(
    "global_batch, workers, max_per_device, expected",
    [(512, 16, 8, (8, 4)), (32, 16, 2, (2, 1)), (8, 2, 4, (4, 1)), (512, 2, 8, (8, 32)), (48, 2, 5, (4, 6)),
     (6, 6, 8, (1, 1))],
)
def test_global_batch_is_the_unit(global_batch, workers, max_per_device, expected):
    per_device, accumulation = derive_batch(global_batch, workers, max_per_device)
    assert (per_device, accumulation) == expected
    assert per_device * accumulation * workers == global_batch and per_device <= max_per_device


def test_batch_that_cannot_divide_fails_early():
    with pytest.raises(ValueError, match="does not divide over 3 workers"):
        derive_batch(8, 3, 4)


def test_every_problem_is_one_line_with_file_line_and_key(tmp_path):
    path = write(tmp_path, """\
        name: broken
        hardware:
          num_workers: 0
        train_sft:
          learning_rate: -1.0
          global_batch_size: 8
          colour: blue
        train_dpo:
          learning_rate: 1.0e-6
          global_batch_size: 8
          beta: 0
          max_length: "long"
        """)
    found = problems(path)
    assert found == [
        f"{path}:3: hardware.num_workers: Input should be greater than 0 (got 0)",
        f"{path}:5: train_sft.learning_rate: Input should be greater than 0 (got -1.0)",
        f"{path}:7: train_sft.colour: unknown key",
        f"{path}:11: train_dpo.beta: Input should be greater than 0 (got 0)",
        f"{path}:12: train_dpo.max_length: Input should be a valid integer, unable to parse string as an integer "
        "(got 'long')",
    ]


def test_cross_field_problems_are_reported_beside_field_errors(tmp_path):
    path = write(tmp_path, """\
        name: x
        hardware: {accelerator: cpu, num_workers: 3}
        train_sft: {learning_rate: 1.0e-5, global_batch_size: 8}
        judge: {kind: openai}
        serve:
          models: [{model_id: a}, {model_id: b, min_replicas: 3, max_replicas: 2}]
        """)
    assert problems(path) == [
        f"{path}:3: train_sft.global_batch_size: global_batch_size 8 does not divide over 3 workers; "
        "use a multiple of 3",
        f"{path}:4: judge: kind 'openai' needs an `endpoint`",
        f"{path}:6: serve.models.1: min_replicas (3) exceeds max_replicas (2)",
    ]


def test_a_judge_with_both_backends_is_refused_naming_the_one_that_would_not_run(tmp_path):
    """A rubric judge turned into kind 'openai' by adding an endpoint keeps its `engine` unless removed: `plan` and
    the cluster checks would count an engine that never starts, so `validate` names it (and the reverse)."""
    engine = "engine: {model: ./m}"
    endpoint = "endpoint: {base_url: 'http://127.0.0.1:9/v1', model: j}"
    openai = write(tmp_path, f"name: x\njudge: {{kind: openai, {engine}, {endpoint}}}\n")
    assert problems(openai) == [f"{openai}:2: judge: kind 'openai' asks its `endpoint`; remove `engine` (no engine "
                                "would run)"]
    rubric = write(tmp_path, f"name: y\njudge: {{kind: rubric, {engine}, {endpoint}}}\n")
    assert problems(rubric) == [f"{rubric}:2: judge: kind 'rubric' runs its `engine`; remove `endpoint` (only kind "
                                "'openai' asks one)"]


@pytest.mark.parametrize("workers", ["3.0", "'3'"])
def test_a_worker_count_written_as_a_float_or_string_is_checked_as_the_recipe_reads_it(tmp_path, workers):
    """pydantic reads 3.0 and "3" as 3 workers, so the batch check must too (hypothesis found 3.0 named nothing)."""
    path = write(tmp_path, f"""\
        name: x
        hardware: {{accelerator: cpu, num_workers: {workers}}}
        train_sft: {{learning_rate: 1.0e-5, global_batch_size: 8}}
        """)
    assert problems(path) == [f"{path}:3: train_sft.global_batch_size: global_batch_size 8 does not divide over 3 "
                              "workers; use a multiple of 3"]


def test_unknown_section_and_missing_name(tmp_path):
    assert problems(write(tmp_path, "trian_sft: {}\n")) == [
        f"{tmp_path / 'recipe.yaml'}:1: name: missing required key",
        f"{tmp_path / 'recipe.yaml'}:1: trian_sft: unknown key",
    ]


@pytest.mark.parametrize(
    "text, expected",
    [("name: [\n", ":2: invalid YAML"), ("- a\n- b\n", ": a recipe is a mapping of sections, got list"),
     ("", ": a recipe is a mapping of sections, got NoneType")],
)
def test_unreadable_recipes(tmp_path, text, expected):
    path = write(tmp_path, text)
    (only,) = problems(path)
    assert only.startswith(f"{path}{expected}")


def test_missing_and_non_utf8_files(tmp_path):
    assert problems(tmp_path / "nope.yaml") == [f"{tmp_path / 'nope.yaml'}: no such file"]
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"name: caf\xe9\n")
    (only,) = problems(bad)
    assert only.startswith(f"{bad}: not UTF-8 text")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zephyr_ray.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_cli_validate_prints_problems_without_traceback(tmp_path):
    path = write(tmp_path, "name: x\ntrain_dpo: {learning_rate: -1, global_batch_size: 32, beta: -0.5}\n")
    result = cli("validate", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"error: {path}:2: train_dpo.learning_rate: Input should be greater than 0 (got -1)",
        f"error: {path}:2: train_dpo.beta: Input should be greater than 0 (got -0.5)",
    ]


def test_cli_validate_checks_local_paths(tmp_path):
    path = write(tmp_path, """\
        name: x
        hardware: {accelerator: cpu, num_workers: 2}
        synthesize:
          seeds: {path: ./no/such/prompts.jsonl}
          teacher: {model: ./no/such/model}
        train_sft: {model: mistralai/Mistral-7B-v0.1, learning_rate: 1.0e-5, global_batch_size: 8}
        judge:
          kind: openai
          endpoint: {base_url: "http://127.0.0.1:9/v1", model: j, api_key_env: ZR_SURELY_UNSET_KEY}
        """)
    result = cli("validate", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: {path}: synthesize.seeds.path: no such file or directory: ./no/such/prompts.jsonl" in result.stderr
    assert f"error: {path}: synthesize.teacher.model: ./no/such/model: no such model directory" in result.stderr
    assert "train_sft: model mistralai/Mistral-7B-v0.1 is a hub id" in result.stdout
    (tmp_path / "prompts.csv").write_text("prompt\nHow do bees make honey?\n")  # a format the stages do not read
    path.write_text(path.read_text().replace("./no/such/prompts.jsonl", str(tmp_path / "prompts.csv")))
    result = cli("validate", str(path))
    assert f"error: {path}: synthesize.seeds.path: not a .jsonl, .json or .parquet file: {tmp_path / 'prompts.csv'}" \
        in result.stderr
    assert "judge.endpoint.api_key_env: ZR_SURELY_UNSET_KEY is not set here" in result.stdout


def test_cli_validate_accepts_the_shipped_recipes(tiny_models):
    for name in ("tiny-cpu.yaml", "zephyr-7b.yaml"):
        result = cli("validate", f"jobs/configs/{name}")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().endswith(")") and ": ok (" in result.stdout
    # each note under its own key: this run's models are not taken for the hub id or dataset noted before them
    assert "note: evaluate.model.model: train_dpo is this run's train_dpo model" in result.stdout
    assert "evaluate.model: model" not in result.stdout and "pairwise.baseline: dataset" not in result.stdout


def test_a_missing_model_is_one_error_under_its_own_key(tiny_models, tmp_path):
    recipe = yaml.safe_load((REPO / "jobs" / "configs" / "tiny-cpu.yaml").read_text())
    recipe["judge"]["engine"]["model"] = "./artifacts/tiny-models/jduge"
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = cli("validate", str(tmp_path / "recipe.yaml"))
    assert result.returncode == 2 and result.stderr.splitlines() == [
        f"error: {tmp_path / 'recipe.yaml'}: judge.engine.model: ./artifacts/tiny-models/jduge: no such model "
        "directory"], result.stderr


def test_stage_run_and_evaluate_share_one_default_run_dir(tmp_path):
    """`zephyr-ray stage X recipe` then `zephyr-ray evaluate recipe` (no --run-dir either time) work on one run:
    runs/<recipe name> (stage's default was runs/latest)."""
    write(tmp_path, "name: one-run\nhardware: {accelerator: cpu, num_workers: 1}\n")
    shown = subprocess.run([sys.executable, "-m", "zephyr_ray.cli", "stage", "binarize", "recipe.yaml"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert shown.returncode == 2 and "recipe 'one-run' has no `binarize` section" in shown.stderr, shown.stderr
    assert [p.relative_to(tmp_path).as_posix() for p in (tmp_path / "runs").rglob("*")] == [
        "runs/one-run", "runs/one-run/logs", "runs/one-run/logs/stage-binarize.log"]


def test_cli_help_lists_commands():
    result = cli("--help")
    assert result.returncode == 0
    for command in ("tiny-models", "validate", "chat", "demo"):
        assert command in result.stdout


def test_one_score_judges_need_binarize_on_overall(tmp_path):
    path = write(tmp_path, """\
        name: x
        judge: {kind: logprob, engine: {model: ./m}}
        binarize: {score: mean_aspects}
        """)
    assert problems(path) == [f"{path}:3: binarize.score: a 'logprob' judge gives one overall score, "
                              "not aspects; set binarize.score: overall"]


def test_dpo_losses_combine_as_trl_takes_them(tmp_path):
    """[sigmoid, sft] (DPO plus the chosen reply's NLL) reaches TRL's DPOConfig as given; a typo or a weight count
    that does not match is one line at validate, naming the key."""
    from trl import DPOConfig

    from zephyr_ray.train.dpo import dpo_arguments

    path = write(tmp_path, """\
        name: x
        train_dpo: {learning_rate: 1.0e-4, global_batch_size: 32, loss_type: [sigmoid, sft], loss_weights: [1.0, 0.5]}
        """)
    args = DPOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, **dpo_arguments(load_recipe(path).train_dpo))
    assert args.loss_type == ["sigmoid", "sft"] and args.loss_weights == [1.0, 0.5] and args.beta == 0.1
    assert dpo_arguments(load_recipe(CONFIGS / "zephyr-7b.yaml").train_dpo)["loss_type"] == ["sigmoid"]
    section = "name: x\ntrain_dpo: {learning_rate: 1.0e-4, global_batch_size: 32, "
    typo = write(tmp_path, section + "loss_type: [sigmoid, nll]}\n")
    assert len(problems(typo)) == 1 and "train_dpo" in problems(typo)[0] and "['nll']" in problems(typo)[0]
    uneven = write(tmp_path, section + "loss_type: [sigmoid, sft], loss_weights: [1.0]}\n")
    assert len(problems(uneven)) == 1 and "loss_weights" in problems(uneven)[0]


def _model_dir(tmp_path: Path, **config: object) -> Path:
    import json

    model = tmp_path / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps(config))
    return model


@pytest.mark.parametrize("config, expected", [
    ({"max_position_embeddings": 2048}, (2048, "max_position_embeddings in its config.json")),
    ({"n_positions": 1024, "max_position_embeddings": 4096}, (1024, "n_positions in its config.json")),
    ({"text_config": {"max_position_embeddings": 512}}, (512, "max_position_embeddings in its config.json")),
    ({"max_position_embeddings": 4096, "rope_scaling": {"type": "linear", "factor": 2.0}},
     (8192, "max_position_embeddings in its config.json, with RoPE scaling x2")),
    ({"max_position_embeddings": 131072, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     (131072, "max_position_embeddings in its config.json")),
    ({"hidden_size": 8}, None),
])
def test_a_models_own_context_limit_is_read_from_its_config(tmp_path, config, expected):
    from zephyr_ray.engines import model_context_limit

    assert model_context_limit(str(_model_dir(tmp_path, **config))) == expected


def test_max_model_len_defaults_to_the_models_limit_capped_and_refuses_more(tmp_path):
    from zephyr_ray.config import Engine, Hardware
    from zephyr_ray.engines import context_length, vllm_engine_kwargs

    model = str(_model_dir(tmp_path, max_position_embeddings=2048))
    cpu = Hardware(accelerator="cpu", num_workers=1)
    assert context_length(Engine(model=model), cpu) == 2048
    assert vllm_engine_kwargs(Engine(model=model), cpu)["max_model_len"] == 2048
    assert context_length(Engine(model=model), cpu.model_copy(update={"max_model_len_cap": 1024})) == 1024
    assert context_length(Engine(model=model, max_model_len=512), cpu) == 512
    with pytest.raises(ValueError, match=r"^max_model_len 4096 is above the limit of .*model: 2048 tokens "
                                         r"\(max_position_embeddings in its config.json\)"):
        vllm_engine_kwargs(Engine(model=model, max_model_len=4096), cpu)
    unknown = str(tmp_path / "no-config")
    assert "max_model_len" not in vllm_engine_kwargs(Engine(model=unknown), cpu), "vLLM's own rule then"


def test_a_cpu_engine_reserves_only_the_kv_cache_its_sequences_can_fill(tmp_path):
    """No kv_cache_gib on CPU: 256 full-length sequences' keys and values (fp32), unless that is more than vLLM's
    own share of RAM; a configured size, GPUs and models without the needed config keys are left as they were."""
    from zephyr_ray.config import Engine, Hardware
    from zephyr_ray.engines import CPU_KV_CACHE_FRACTION, vllm_engine_kwargs

    cpu, gpu = Hardware(accelerator="cpu", num_workers=1), Hardware(accelerator="gpu", num_workers=1)
    small = str(_model_dir(tmp_path / "small", max_position_embeddings=2048, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=64))
    assert vllm_engine_kwargs(Engine(model=small), cpu)["kv_cache_memory_bytes"] == 2 * 2 * 1 * 64 * 4 * 2048 * 256
    assert vllm_engine_kwargs(Engine(model=small, max_model_len=512, engine_kwargs={"max_num_seqs": 8}),
                              cpu)["kv_cache_memory_bytes"] == 2 * 2 * 1 * 64 * 4 * 512 * 8
    assert vllm_engine_kwargs(Engine(model=small, kv_cache_gib=0.25), cpu)["kv_cache_memory_bytes"] == 2**28
    assert "kv_cache_memory_bytes" not in vllm_engine_kwargs(Engine(model=small), gpu)
    # head_dim from hidden_size / heads, and no separate key-value heads: still known
    derived = str(_model_dir(tmp_path / "derived", max_position_embeddings=1024, num_hidden_layers=4,
                             num_attention_heads=4, hidden_size=256))
    assert vllm_engine_kwargs(Engine(model=derived), cpu)["kv_cache_memory_bytes"] == 2 * 4 * 4 * 64 * 4 * 1024 * 256
    big = str(_model_dir(tmp_path / "big", max_position_embeddings=8192, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128))
    kwargs = vllm_engine_kwargs(Engine(model=big), cpu)
    assert "kv_cache_memory_bytes" not in kwargs and kwargs["gpu_memory_utilization"] == CPU_KV_CACHE_FRACTION
    assert "kv_cache_memory_bytes" not in vllm_engine_kwargs(
        Engine(model=str(_model_dir(tmp_path / "bare", max_position_embeddings=512))), cpu)
    odd = str(_model_dir(tmp_path / "odd", max_position_embeddings=512, num_hidden_layers=2, num_attention_heads=2,
                         hidden_size="128"))  # a config.json that says its size as a string: vLLM's default then
    assert "kv_cache_memory_bytes" not in vllm_engine_kwargs(Engine(model=odd), cpu)


def test_serve_skips_rays_model_download_for_a_local_directory_only(tiny_models):
    from zephyr_ray.config import Hardware, ServedModel
    from zephyr_ray.serving import LocalModelCallback, llm_config

    cpu = Hardware(accelerator="cpu", num_workers=1)
    local = llm_config(ServedModel(model_id="m"), str(tiny_models["teacher"]), cpu)
    assert local.callback_config.callback_class is LocalModelCallback
    hub = llm_config(ServedModel(model_id="m", max_model_len=512), "HuggingFaceH4/zephyr-7b-beta", cpu)
    assert hub.callback_config.callback_class is not LocalModelCallback


def refused_at_validate_and_at_start(path: Path, expected: str, run_dir: Path) -> None:
    """``validate`` and ``stage complete`` both print ``expected`` as their one error line, exit 2, no traceback,
    and the stage writes nothing."""
    validated = cli("validate", str(path))
    assert validated.returncode == 2 and "Traceback" not in validated.stderr
    assert validated.stderr.splitlines() == [f"error: {path}: {expected}"]
    started = cli("stage", "complete", str(path), "--run-dir", str(run_dir))
    assert started.returncode == 2 and "Traceback" not in started.stderr
    assert started.stderr.splitlines() == [f"error: {expected}"] and not (run_dir / "complete").exists()


def test_a_max_model_len_above_the_models_limit_is_an_error_at_validate_and_at_start(tiny_models, tmp_path):
    """Named by its key and with the model's limit, before Ray or any engine starts (no Serve retry loop)."""
    teacher = tiny_models["teacher"]
    path = write(tmp_path, f"""\
        name: x
        hardware: {{accelerator: cpu, num_workers: 1}}
        complete:
          prompts: {{path: {REPO / "jobs" / "data" / "tiny_prompts.jsonl"}}}
          models:
            - {{name: a, engine: {{model: {teacher}, max_model_len: 4096}}}}
            - {{name: b, engine: {{model: {teacher}}}}}
        """)
    expected = (f"complete.models.0.engine.max_model_len: max_model_len 4096 is above the limit of {teacher}: 2048 "
                "tokens (max_position_embeddings in its config.json); lower max_model_len or leave it unset")
    refused_at_validate_and_at_start(path, expected, tmp_path / "run")
    for command in (["chat", str(teacher), "-m", "hi"], ["serve", str(teacher)]):
        refused = cli(*command, "--max-model-len", "4096")
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        assert refused.stderr.splitlines() == [
            f"error: --max-model-len: max_model_len 4096 is above the limit of {teacher}: 2048 tokens "
            "(max_position_embeddings in its config.json); lower max_model_len or leave it unset"]


def test_a_pool_model_without_a_chat_template_is_an_error_at_validate_and_at_start(tiny_models, tmp_path):
    """generator-2 ships no template (as Vicuna-style pool models): named by its key and model, before Ray or any
    engine starts; 'zephyr', Jinja text or a .jinja file clears it, and a missing file is a load error."""
    bare = tiny_models["generator-2"]
    recipe = f"""\
        name: x
        hardware: {{accelerator: cpu, num_workers: 1}}
        complete:
          prompts: {{path: {REPO / "jobs" / "data" / "tiny_prompts.jsonl"}}}
          models:
            - {{name: a, engine: {{model: {tiny_models["generator-0"]}}}}}
            - {{name: b, engine: {{model: {bare}CHOICE}}}}
        """
    path = write(tmp_path, recipe.replace("CHOICE", ""))
    expected = (f"complete.models.1.engine.chat_template: {bare} ships no chat template (none in "
                "tokenizer_config.json, no chat_template.jinja): set one ('zephyr', Jinja text, or a .jinja file)")
    refused_at_validate_and_at_start(path, expected, tmp_path / "run")

    template_file = tmp_path / "zephyr.jinja"
    template_file.write_text(ZEPHYR_CHAT_TEMPLATE)
    for choice in (", chat_template: zephyr", f", chat_template: {template_file}"):
        path = write(tmp_path, recipe.replace("CHOICE", choice))
        assert cli("validate", str(path)).returncode == 0
        engine = load_recipe(path).complete.models[1].engine
        assert template_text(engine.chat_template) == ZEPHYR_CHAT_TEMPLATE
    path = write(tmp_path, recipe.replace("CHOICE", f", chat_template: {tmp_path / 'gone.jinja'}"))
    validated = cli("validate", str(path))
    assert validated.returncode == 2 and "Traceback" not in validated.stderr
    assert f"{path}:7: complete.models.1.engine.chat_template: cannot read the template file " \
        f"{tmp_path / 'gone.jinja'}: No such file or directory" in validated.stderr, validated.stderr


def test_a_served_model_without_a_chat_template_is_refused_by_validate_and_takes_one_from_the_recipe(tiny_models,
                                                                                                    tmp_path):
    bare = tiny_models["generator-2"]
    recipe = f"""\
        name: x
        hardware: {{accelerator: cpu, num_workers: 1}}
        serve:
          models:
            - {{model_id: bare, model: {bare}CHOICE}}
        """
    refused = cli("validate", str(write(tmp_path, recipe.replace("CHOICE", ""))))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"serve.models.0.chat_template: {bare} ships no chat template" in refused.stderr, refused.stderr
    path = write(tmp_path, recipe.replace("CHOICE", ", chat_template: zephyr"))
    assert cli("validate", str(path)).returncode == 0
    assert load_recipe(path).serve.models[0].engine(str(bare)).chat_template == "zephyr"


def test_a_recipe_with_a_base_is_its_base_with_its_own_keys_laid_over(tmp_path):
    shipped = load_recipe(REPO / "jobs" / "configs" / "tiny-cpu-rounds.yaml")
    base = load_recipe(REPO / "jobs" / "configs" / "tiny-cpu.yaml")
    assert shipped.name == "tiny-cpu-rounds" and shipped.rounds.count >= 2 and base.rounds is None
    assert shipped.train_dpo == base.train_dpo and shipped.complete == base.complete
    variant = tmp_path / "variant.yaml"
    variant.write_text(f"base: {REPO / 'jobs' / 'configs' / 'tiny-cpu.yaml'}\nname: v\ntrain_dpo: {{beta: 0.5}}\n")
    changed = load_recipe(variant)
    assert changed.train_dpo.beta == 0.5 and changed.train_dpo.loss_type == base.train_dpo.loss_type
    cycle = tmp_path / "cycle.yaml"
    cycle.write_text("base: cycle.yaml\nname: c\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(cycle)
    missing = tmp_path / "missing.yaml"
    missing.write_text("base: nowhere.yaml\nname: m\n")
    with pytest.raises(RecipeError, match="nowhere.yaml"):
        load_recipe(missing)


def test_a_variant_that_switches_a_judge_names_only_the_switch(tmp_path):
    """The README's judge blocks pasted into `base: tiny-cpu.yaml` variants, as its "a variant names only what it
    changes" invites: an `endpoint` drops the base's `engine` (and an `engine` the base's `endpoint`), another
    `kind` drops the prompts the base wrote for its own kind, and everything else is kept. Before, the README's
    blocks were refused ("remove `engine`", which lives in the base) and a logprob judge kept the rubric prompt."""
    import re

    readme = (REPO / "README.md").read_text()
    blocks = [yaml.safe_load(textwrap.dedent(block))
              for _, block in re.findall(r"^( *)```yaml\n(.*?)^\1```", readme, re.MULTILINE | re.DOTALL)]
    openai_judge = next(b for b in blocks if isinstance(b, dict) and b.get("judge", {}).get("kind") == "openai")
    evaluation = next(b for b in blocks if isinstance(b, dict) and "evaluate" in b)
    base = load_recipe(CONFIGS / "tiny-cpu.yaml")
    assert base.judge.engine and base.judge.prompt and base.evaluate.judge.engine  # what a switch must drop

    def variant(name: str, changes: dict, over: Path = CONFIGS / "tiny-cpu.yaml"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"base": str(over), "name": name, **changes}))
        return load_recipe(path)

    asked = variant("openai", openai_judge)
    assert asked.judge.kind == "openai" and asked.judge.engine is None and asked.judge.prompt is None
    assert asked.judge.endpoint.model == openai_judge["judge"]["endpoint"]["model"]
    assert asked.complete == base.complete and asked.evaluate == base.evaluate
    graded = variant("evaluate", {"evaluate": {"judge": evaluation["evaluate"]["judge"]}})
    assert graded.evaluate.judge.engine is None and graded.evaluate.judge.endpoint.model == "gpt-4"
    assert graded.evaluate.model == base.evaluate.model and graded.evaluate.mt_bench == base.evaluate.mt_bench
    assert graded.evaluate.judge.sampling == base.evaluate.judge.sampling  # what the block leaves to the base
    logprob = variant("logprob", {"judge": {"kind": "logprob"}, "binarize": {"score": "overall"}})
    assert logprob.judge.engine == base.judge.engine and (logprob.judge.prompt, logprob.judge.system_prompt) == (
        None, None), "the project's logprob prompt, not the one the base wrote for its rubric judge"
    reward = variant("reward", {"judge": {"kind": "reward_model", "engine": {"model": "./m/reward"}},
                                "binarize": {"score": "overall"}})
    assert reward.judge.engine.model == "./m/reward"
    assert reward.judge.engine.max_model_len == base.judge.engine.max_model_len  # the engine's mapping merges
    same = variant("same-kind", {"judge": {"kind": base.judge.kind, "sampling": {"temperature": 0.5}}})
    assert same.judge.prompt == base.judge.prompt and same.judge.sampling.temperature == 0.5
    with pytest.raises(RecipeError, match=r"kind 'rubric' needs an `engine` \(an `endpoint` is asked by kind "
                                          r"'openai' only: set `kind: openai`\)"):
        variant("no-kind", {"judge": {"endpoint": openai_judge["judge"]["endpoint"]}})  # the switch half made
    local = variant("local", {"judge": {"kind": "rubric", "engine": {"model": "HuggingFaceH4/zephyr-7b-beta"}}},
                    over=CONFIGS / "zephyr-7b.yaml")
    assert local.judge.endpoint is None and local.judge.engine.model == "HuggingFaceH4/zephyr-7b-beta"


def test_a_mistake_in_a_base_is_reported_in_the_base_and_the_variants_own_in_the_variant(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("name: b\ntrain_sft:\n  model: m\n  learning_rate: 1.0e-5\n  global_batch_size: 16\n"
                    "  num_epoch: 2\n")
    variant = tmp_path / "variant.yaml"
    variant.write_text("base: base.yaml\nname: v\n"
                       "train_dpo: {learning_rate: 1.0e-6, global_batch_size: 16, beta: -1}\n")
    assert problems(variant) == [f"{variant}:3: train_dpo.beta: Input should be greater than 0 (got -1)",
                                 f"{base}:6: train_sft.num_epoch: unknown key"]


def test_a_key_given_twice_is_an_error_not_a_silent_loss(tmp_path):
    """YAML keeps the last of two equal keys: a second train_sft section would drop the first without a word."""
    path = write(tmp_path, """\
        name: x
        train_sft: {model: m, learning_rate: 1.0e-5}
        train_dpo: {beta: 0.1}
        train_sft: {num_epochs: 2}
        """)
    assert problems(path) == [f"{path}:4: train_sft: duplicate key (also at line 2; only one of them would count)"]
    base = tmp_path / "base.yaml"
    base.write_text("name: b\ntrain_dpo: {beta: 0.1, beta: 0.2}\n")
    (tmp_path / "variant.yaml").write_text("base: base.yaml\nname: v\n")
    assert problems(tmp_path / "variant.yaml") == [
        f"{base}:2: train_dpo.beta: duplicate key (also at line 2; only one of them would count)"]


@pytest.mark.parametrize(("rounds", "message"), [
    ({"count": 2, "samples": 1}, "rounds: samples: with pool: replace"),
    ({"count": 2, "dpo": {"num_epochs": [1, 2, 3]}}, "give one value per round (2), got 3"),
    ({"count": 0}, "rounds.count"),
])
def test_rounds_are_checked_when_the_recipe_loads(tmp_path, rounds, message):
    recipe = tmp_path / "rounds.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(REPO / "jobs" / "configs" / "tiny-cpu.yaml"), "name": "r",
                                      "rounds": rounds}))
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe)
    assert message in "\n".join(err.value.problems), err.value.problems


def test_split_rounds_put_each_prompt_in_one_round_and_refuse_an_empty_round_up_front():
    from zephyr_ray.rounds import split_for_rounds

    rows = [{"prompt_id": f"p{i}"} for i in range(12)]
    parts = split_for_rounds(rows, seed=0, count=3)
    assert sorted(r["prompt_id"] for part in parts for r in part) == sorted(r["prompt_id"] for r in rows)
    ids = lambda split: [sorted(r["prompt_id"] for r in part) for part in split]  # noqa: E731
    assert ids(parts) == ids(split_for_rounds(rows[::-1], seed=0, count=3)), "a prompt's round: its id alone"
    with pytest.raises(ValueError, match=r"would have no prompts \(2 prompts split 4 ways"):
        split_for_rounds(rows[:2], seed=0, count=4)


def test_joined_pool_completions_cannot_take_the_policys_sample_names(tmp_path):
    recipe = tmp_path / "rounds.yaml"
    pool = [{"name": name, "engine": {"model": "m"}} for name in ("policy-2", "other")]
    recipe.write_text(yaml.safe_dump({"base": str(REPO / "jobs" / "configs" / "tiny-cpu.yaml"), "name": "r",
                                      "complete": {"models": pool},
                                      "rounds": {"count": 2, "pool": "join", "samples": 2}}))
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe)
    assert "rounds.pool: pool completions named ['policy-2'] would share the policy's samples' names" in \
        "\n".join(err.value.problems), err.value.problems


@pytest.mark.parametrize("pool", ["join", "replace"])
def test_a_rounds_recipe_samples_the_previous_rounds_model_beside_the_pool_or_alone(tmp_path, pool):
    """Round 2's recipe as `rounds.round_recipe` derives it (its prompts already drawn): the policy is round 1's
    model, with the pool models before it when they join; DPO starts from it; the evaluation puts it against dSFT."""
    from zephyr_ray.rounds import round_recipe

    shipped = load_recipe(REPO / "jobs" / "configs" / "tiny-cpu-rounds.yaml")
    recipe = shipped.model_copy(update={"rounds": shipped.rounds.model_copy(update={"pool": pool})})
    run_dir = tmp_path / "run"
    (run_dir / "rounds" / "2").mkdir(parents=True)
    (run_dir / "rounds" / "2" / "prompts.jsonl").write_text('{"prompt": "a question", "prompt_id": "q"}\n')
    second = round_recipe(recipe, run_dir, 2)
    pool_names = [m.name for m in shipped.complete.models] if pool == "join" else []
    assert [m.name for m in second.complete.models] == pool_names + ["policy"]
    policy, round_1 = second.complete.models[-1], run_dir.resolve() / "rounds" / "1" / "train_dpo" / "model"
    assert policy.engine.model == str(round_1) == second.train_dpo.model
    assert policy.samples == shipped.rounds.samples and second.complete.prompts.path.endswith("2/prompts.jsonl")
    assert second.evaluate.model.name == "round-2" and second.evaluate.model.model == str(
        run_dir.resolve() / "rounds" / "2" / "train_dpo" / "model")
    assert second.evaluate.pairwise.baseline.model == str(run_dir.resolve() / "train_sft" / "model")
    assert second.synthesize is None and second.train_sft is None and second.rounds is None


def test_direct_streaming_serves_one_model_and_validate_says_so(tmp_path):
    recipe = yaml.safe_load((CONFIGS / "tiny-cpu.yaml").read_text())
    recipe["serve"] = {"direct_streaming": True, "models": [{"model_id": "a"}, {"model_id": "b"}]}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(recipe))
    validated = cli("validate", str(path))
    assert validated.returncode == 2 and "Traceback" not in validated.stderr
    assert "direct_streaming serves one model (Ray Serve LLM's limit), got 2: ['a', 'b']" in validated.stderr
    recipe["serve"]["models"] = [{"model_id": "a", "engine_kwargs": {"api_key": "x", "enforce_eager": True}}]
    path.write_text(yaml.safe_dump(recipe))
    validated = cli("validate", str(path))
    assert validated.returncode == 2 and "models[0].engine_kwargs: ['api_key'] would change vLLM's own app" in \
        validated.stderr
    recipe["serve"]["models"] = [{"model_id": "a"}]
    path.write_text(yaml.safe_dump(recipe))
    assert load_recipe(path).serve.direct_streaming


def test_a_port_another_program_listens_on_is_in_use_whatever_its_socket_options():
    """``port_in_use``, which `zephyr-ray serve` asks before it starts Serve: a listener with SO_REUSEPORT (as Ray
    Serve's proxy binds, which a second Serve would share silently) or without it, on the host asked or on every
    interface, holds the port; once closed (its connections in TIME_WAIT) it is free again, as a server sees it.
    Another failure to bind (here: an address this machine does not have) is not "in use": Serve decides."""
    import socket

    from zephyr_ray.serving import port_in_use

    for listen_on in ("127.0.0.1", "0.0.0.0"):
        for reuse_port in (True, False):
            with socket.socket() as server:
                server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                server.bind((listen_on, 0))
                server.listen()
                port = server.getsockname()[1]
                assert port_in_use("127.0.0.1", port) and port_in_use("0.0.0.0", port), (listen_on, reuse_port)
                with socket.create_connection(("127.0.0.1", port)):
                    accepted, _ = server.accept()
                    accepted.close()  # the server side closes first: its end stays in TIME_WAIT
            assert not port_in_use("127.0.0.1", port) and not port_in_use("0.0.0.0", port), (listen_on, reuse_port)
    # only "address in use" counts: an address of another machine is left to Serve, as any other failure to bind
    assert not port_in_use("192.0.2.254", port)
