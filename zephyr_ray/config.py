"""The recipe: one YAML file, one typed section per stage, validated at load.

Errors name the file, the line and the key path (``tiny-cpu.yaml:12: train_dpo.beta: ...``), one line per problem,
so a user fixes every mistake in one pass. Defaults are the Zephyr paper's settings where the paper states them.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

PositiveInt = Field(gt=0)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatasetSource(_Section):
    """Where a stage reads rows from: a hub dataset id, a local JSONL/Parquet file or directory."""

    path: str
    split: str = "train"
    name: str | None = Field(default=None, description="the hub dataset's configuration name")
    limit: int | None = Field(default=None, gt=0, description="read only the first N rows (smoke runs)")


class Sampling(_Section):
    """vLLM sampling parameters for one generator."""

    temperature: float = Field(default=0.7, ge=0.0, le=5.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(default=512, gt=0)
    seed: int | None = None


def _named_file_text(value: str | None, suffix: str, what: str) -> str | None:
    """A value that names a ``suffix`` file (and holds no template braces) becomes the file's text, read at load."""
    if value is not None and value.endswith(suffix) and "{" not in value and "\n" not in value:
        try:
            return Path(value).expanduser().read_text(encoding="utf-8")
        except OSError as err:
            raise ValueError(f"cannot read the {what} file {value}: {err.strerror or err}") from None
    return value


def read_template_file(value: str | None) -> str | None:
    """A ``chat_template`` that names a ``.jinja`` file becomes the file's text, read when the recipe is loaded."""
    return _named_file_text(value, ".jinja", "template")


class Engine(_Section):
    """A model served by vLLM inside a Ray Data or Ray Serve replica."""

    model: str = Field(description="hub id or local model directory")
    max_model_len: int | None = Field(default=None, gt=0, description="prompt + answer tokens; default: the "
                                      "model's own limit (its config.json), at most hardware.max_model_len_cap. "
                                      "Above the model's limit is an error")
    tensor_parallel_size: int = Field(default=1, gt=0)
    batch_size: int = Field(default=64, gt=0, description="rows per Ray Data batch sent to one engine")
    concurrency: int | tuple[int, int] | Literal["auto"] = Field(
        default="auto", description="engine replicas: a number (that many from the start), a [min, max] range Ray "
        "Data autoscales within, or "
        "'auto': the cluster's GPUs (at least hardware.num_workers) shared by the models that run side by side, "
        "divided by the GPUs one engine takes (tensor x pipeline parallel); 1 on CPU")

    @field_validator("concurrency")
    @classmethod
    def _replicas(cls, value: Any) -> Any:
        if isinstance(value, int) and value < 1:
            raise ValueError("concurrency must be at least 1")
        if isinstance(value, tuple) and not 1 <= value[0] <= value[1]:
            raise ValueError(f"concurrency [min, max] needs 1 <= min <= max, got {list(value)}")
        return value
    accelerator_type: str | None = Field(default=None, description="run the engines only on nodes with this Ray "
                                         "accelerator type (e.g. A100, H100: the `accelerator_type:<name>` "
                                         "resource Ray gives GPU nodes); default: any node with the GPUs")
    kv_cache_gib: float | None = Field(default=None, gt=0.0, description="KV cache size; default: vLLM's own rule "
                                       "on GPU, 30% of host RAM on CPU")
    trust_remote_code: bool = Field(default=False, description="run code shipped with the model: only if you trust it")
    chat_template: str | None = Field(default=None, description="how this engine renders conversations: 'zephyr', "
                                      "Jinja text, or a path to a .jinja file (read when the recipe is loaded); "
                                      "default: the model's own (tokenizer_config.json or chat_template.jinja). A "
                                      "model that ships none needs one")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to vLLM as they are")

    _template_file = field_validator("chat_template")(lambda value: read_template_file(value))


class Hardware(_Section):
    """What the recipe runs on; ``engines.py`` turns this into vLLM kwargs, placement bundles and DeepSpeed configs."""

    accelerator: Literal["cpu", "gpu"] = "gpu"
    num_workers: int = Field(default=16, gt=0, description="Ray Train workers (one per GPU)")
    cpus_per_worker: int = Field(default=1, gt=0)
    max_model_len_cap: int = Field(default=8192, gt=0, description="engines that set no max_model_len get the "
                                   "model's own limit, at most this (a 32k-context model's KV cache for one "
                                   "sequence may not fit otherwise)")
    cpu_node_group: str | None = Field(
        default=None, description="the worker group where work that needs no accelerator runs (reads, validation, "
        "prompt templating, the endpoint judge, binarize, writes), by Ray's `ray.io/node-group` node label: the node "
        "type's name in cluster.yaml, the worker group's groupName in KubeRay; engines keep off it. None: anywhere")


class Training(_Section):
    """What dSFT and dDPO share. ``global_batch_size`` is the unit; per-device batch and accumulation are derived."""

    model: str | None = Field(default=None, description="model to train; by default the previous stage's output")
    learning_rate: float = Field(gt=0.0)
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = Field(default=0.1, ge=0.0, lt=1.0)
    global_batch_size: int = Field(gt=0)
    max_per_device_batch_size: int = Field(default=8, gt=0, description="largest micro batch one worker runs")
    num_epochs: float = Field(default=1.0, gt=0.0)
    max_length: int = Field(default=2048, gt=0)
    zero_stage: Literal[0, 1, 2, 3] = 3
    bf16: bool = True
    gradient_checkpointing: bool = True
    seed: int = 42
    save_steps: int = Field(default=100, gt=0, description="checkpoint every N optimizer steps (and at the end)")
    save_total_limit: int = Field(default=2, gt=0, description="checkpoints kept in the run's storage (the newest); "
                                  "Ray Train deletes older ones as new ones are registered")
    max_failures: int = Field(default=2, ge=-1, description="worker failures survived by restarting from the "
                              "latest checkpoint; -1: no limit")
    chat_template: str = Field(default="zephyr", description="'zephyr', or a Jinja chat template; saved with the "
                               "model")
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=list, description="experiment trackers the HF Trainer logs to (rank 0), beside Ray Train; "
        "tensorboard writes to <stage>/tensorboard, the others read their settings (keys, URIs) from the workers' "
        "environment"
    )
    trl_args: dict[str, Any] = Field(
        default_factory=dict, description="further fields of TRL's SFTConfig/DPOConfig, passed through as they are"
    )


class Lora(_Section):
    r: int = Field(default=16, gt=0)
    alpha: int = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | str = "all-linear"


class SynthesizeConfig(_Section):
    """UltraChat-style self-chat: the teacher answers, a user simulator writes the next user turn."""

    seeds: DatasetSource | None = Field(default=None, description="seed prompts; omit to use `dataset` as it is")
    dataset: DatasetSource | None = Field(default=None, description="an existing dialogue set instead of synthesis")
    teacher: Engine | None = None
    user_simulator: Engine | None = Field(default=None, description="defaults to the teacher")
    num_turns: int = Field(default=3, gt=0)
    sampling: Sampling = Sampling()
    min_chars: int = Field(default=1, ge=0)
    max_chars: int = Field(default=32000, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> SynthesizeConfig:
        if self.dataset is None and (self.seeds is None or self.teacher is None):
            raise ValueError("give either `dataset`, or `seeds` and `teacher`")
        if self.min_chars >= self.max_chars:
            raise ValueError(f"min_chars ({self.min_chars}) must be below max_chars ({self.max_chars})")
        return self


class TrainSFTConfig(Training):
    """dSFT with TRL's SFTTrainer."""

    packing: bool = True
    packing_strategy: Literal["bfd_split", "bfd", "wrapped"] = Field(
        default="bfd_split", description="TRL's packing: bfd_split splits a dialogue longer than max_length over "
        "packed rows (every token trained on, as the Zephyr recipe's packing did); TRL's own default, bfd, cuts it "
        "at max_length and drops the rest (its last turns and end-of-turn token); wrapped cuts across dialogues")
    assistant_only_loss: bool = False
    lora: Lora | None = None


class PoolModel(_Section):
    name: str
    engine: Engine
    sampling: Sampling = Sampling()
    samples: int = Field(default=1, ge=1, le=64, description="completions per prompt from this model, each with its "
                         "own seed, in one engine pass; with more than one, rows are named <name>-<i> (i from 1)")

    def sample_names(self) -> list[str]:
        """The ``model`` value of this model's completions, one per sample."""
        return [self.name] if self.samples == 1 else [f"{self.name}-{i}" for i in range(1, self.samples + 1)]


ULTRAFEEDBACK_PRINCIPLE_MIX = {"helpfulness": 0.6, "truthfulness": 0.2, "honesty": 0.18, "verbalized_calibration": 0.02}


class CompleteConfig(_Section):
    """Every prompt gets ``samples`` completions (default one) from each model of the pool."""

    prompts: DatasetSource | None = None
    models: list[PoolModel] = Field(default_factory=list)
    principles: bool = Field(default=True, description="draw an UltraFeedback principle system prompt per completion")
    principle_mix: dict[str, float] | Literal["uniform"] = Field(
        default_factory=lambda: dict(ULTRAFEEDBACK_PRINCIPLE_MIX),
        description="how often each principle is drawn: weights by name, or `uniform`; the default is "
        "UltraFeedback's for its UltraChat and ShareGPT prompts (main_vllm.py's sample_principle: helpfulness 3 in "
        "5, truthfulness 1 in 5, honesty 1 in 5 of which a tenth becomes verbalized calibration)")
    principles_as: Literal["system", "user", "auto"] = Field(
        default="auto", description="where the principle goes: a system message, or the start of the first user turn "
        "(for chat templates that refuse a system role); auto: system unless the model's template refuses it")
    seed: int = 0

    @field_validator("principle_mix")
    @classmethod
    def _mix(cls, mix: dict[str, float] | str) -> dict[str, float] | str:
        if isinstance(mix, dict):
            unknown = sorted(set(mix) - set(ULTRAFEEDBACK_PRINCIPLE_MIX))
            if unknown:
                raise ValueError(f"unknown principles {unknown}; known: {sorted(ULTRAFEEDBACK_PRINCIPLE_MIX)}")
            if any(w < 0 for w in mix.values()) or not sum(mix.values()) > 0:
                raise ValueError("weights must be >= 0 with a positive sum")
        return mix

    @field_validator("models")
    @classmethod
    def _pool(cls, models: list[PoolModel]) -> list[PoolModel]:
        if models and sum(m.samples for m in models) < 2:
            raise ValueError("the pool needs at least 2 completions per prompt to compare: 2 models, or a model "
                             f"with `samples` >= 2; got {len(models)} model(s) with one sample")
        names = [m.name for m in models]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"pool model names must be unique, repeated: {duplicated}")
        written = [n for m in models for n in m.sample_names()]  # what the completions are named: <name>-<i>
        clashing = sorted({n for n in written if written.count(n) > 1})
        if clashing:
            raise ValueError(f"completions of two pool models would share a name: {clashing} (a model with samples "
                             "is written as <name>-1, <name>-2, ...): rename one")
        return models


class Endpoint(_Section):
    """An OpenAI-compatible chat endpoint (GPT-4-class judges, a vLLM server, our Serve app).

    The key is read from the environment variable named here when the stage starts, never stored or logged.
    """

    base_url: str = Field(description="up to /v1, e.g. https://api.openai.com/v1")
    model: str
    api_key_env: str | None = Field(default="OPENAI_API_KEY", description="null: the endpoint needs no key")
    qps: float = Field(default=2.0, gt=0.0, description="requests per second over all workers")
    max_retries: int = Field(default=3, ge=0, description="retries on 429/5xx/timeouts, with exponential backoff")
    timeout_s: float = Field(default=120.0, gt=0.0)
    concurrency: int = Field(default=1, gt=0, description="Ray workers sending requests")
    max_in_flight: int = Field(default=8, gt=0, description="requests in flight per worker")
    structured_output: Literal["json_schema", "regex", "none"] = Field(
        default="json_schema", description="json_schema: OpenAI's response_format; regex: vLLM's structured_outputs "
        "(servers that take it); none: parse whatever comes back")


def read_prompt_file(value: str | None) -> str | None:
    """A judge prompt that names a ``.txt`` file becomes the file's text, read when the recipe is loaded."""
    return _named_file_text(value, ".txt", "prompt")


class JudgeConfig(_Section):
    kind: Literal["rubric", "logprob", "reward_model", "openai"] = "rubric"
    engine: Engine | None = None
    endpoint: Endpoint | None = None
    sampling: Sampling = Sampling(temperature=0.0, max_tokens=512)
    prompt: str | None = Field(
        default=None, description="the judge's prompt instead of the project's (UltraFeedback-style rubric, or the "
        "logprob rating): text with {instruction} and {response}, or a .txt file read at load. The answer format "
        "stays the kind's (rubric JSON, one digit 1-5), as structured outputs hold the judge to it. A small judge "
        "learns a short prompt far sooner than a long one")
    system_prompt: str | None = Field(default=None, description="the judge's system message instead of the project's; "
                                      "\"\" for none (a judge whose chat template refuses one, or a small judge "
                                      "that learnt its prompt without one)")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_file(cls, value: Any) -> Any:
        return read_prompt_file(value) if isinstance(value, str) else value

    @field_validator("prompt")
    @classmethod
    def _prompt_fields(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            value.format(instruction="", response="")
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"the prompt may hold only {{instruction}} and {{response}} (write {{{{ and }}}} for "
                             f"literal braces): {type(err).__name__} {err}") from None
        missing = [f for f in ("{instruction}", "{response}") if f not in value]
        if missing:
            raise ValueError(f"the prompt has no {' and no '.join(missing)}")
        return value

    @model_validator(mode="after")
    def _backend(self) -> JudgeConfig:
        if self.kind == "openai" and self.endpoint is None:
            raise ValueError("kind 'openai' needs an `endpoint`" + (
                " (an `engine` is run by kinds rubric, logprob and reward_model)" if self.engine else ""))
        if self.kind != "openai" and self.engine is None:
            raise ValueError(f"kind '{self.kind}' needs an `engine`" + (
                " (an `endpoint` is asked by kind 'openai' only: set `kind: openai`)" if self.endpoint else ""))
        # the other backend would be read by `plan` and the cluster checks but never run: refused, not ignored
        if self.kind == "openai" and self.engine is not None:
            raise ValueError("kind 'openai' asks its `endpoint`; remove `engine` (no engine would run)")
        if self.kind != "openai" and self.endpoint is not None:
            raise ValueError(f"kind '{self.kind}' runs its `engine`; remove `endpoint` (only kind 'openai' asks one)")
        if self.kind == "reward_model" and (self.prompt or self.system_prompt):
            raise ValueError("judge.prompt: a reward model reads the chat itself, not a prompt")
        return self


class BinarizeConfig(_Section):
    dataset: DatasetSource | None = Field(default=None, description="an existing preference set instead of judging "
                                          "(e.g. HuggingFaceH4/ultrafeedback_binarized, split train_prefs)")
    score: Literal["overall", "mean_aspects"] = Field(
        default="mean_aspects", description="the paper ranks by the mean of the aspects; the released set by overall"
    )
    rejected: Literal["random", "lowest"] = "random"
    min_completions: int = Field(default=2, ge=2)
    seed: int = 42


# TRL 1.16's DPOConfig.loss_type values (checked here so that `validate` names a typo before any worker starts)
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


class TrainDPOConfig(Training):
    """dDPO with TRL's DPOTrainer; the dSFT model is the frozen reference."""

    beta: float = Field(default=0.1, gt=0.0)
    loss_type: str | list[str] = Field(
        default="sigmoid", description="TRL's DPO loss, or several summed with `loss_weights`: [sigmoid, sft] is DPO "
        "plus the NLL of the chosen reply (RPO, Iterative RPO), which keeps DPO from lowering the chosen reply's "
        "likelihood along with the rejected one's")
    loss_weights: list[float] | None = Field(default=None, description="one weight per `loss_type` (default 1 each)")
    max_prompt_length: int = Field(default=1024, gt=0)
    reference: str | None = Field(default=None, description="the frozen reference model (a directory or hub id); "
                                  "default: the model DPO starts from (dSFT's), as in Zephyr")

    @property
    def loss_types(self) -> list[str]:
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    @model_validator(mode="after")
    def _losses(self) -> TrainDPOConfig:
        unknown = [t for t in self.loss_types if t not in DPO_LOSS_TYPES]
        if unknown or not self.loss_types:
            raise ValueError(f"loss_type: {unknown or 'empty'} is not among TRL's DPO losses {list(DPO_LOSS_TYPES)}")
        if self.loss_weights is not None and (len(self.loss_weights) != len(self.loss_types)
                                              or any(w < 0 for w in self.loss_weights)):
            raise ValueError(f"loss_weights: give one weight >= 0 per loss_type ({len(self.loss_types)}), got "
                             f"{self.loss_weights}")
        return self

    @model_validator(mode="after")
    def _prompt_fits(self) -> TrainDPOConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be below max_length ({self.max_length})"
            )
        return self


# MT-Bench's sampling temperature per category (FastChat ``llm_judge``): creative categories sample, those with one
# right answer decode greedily. Categories not listed take ``MTBenchConfig.default_temperature``.
MT_BENCH_TEMPERATURES: dict[str, float] = {
    "writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
    "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0,
}
# Categories whose judge sees the reference answer (MT-Bench's reference-guided grading).
MT_BENCH_REFERENCE_CATEGORIES = ("math", "reasoning", "coding", "arena-hard-200")
RUN_MODELS = ("train_dpo", "train_sft")  # model names that mean "that stage's model in this run directory"


class EvalModel(Engine):
    """A model that answers the evaluation: ``train_dpo`` / ``train_sft`` (that stage's model in this run), a model
    directory or a hub id, with the vLLM settings of any engine."""

    name: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*$", description="how results name it (also a directory name)")
    model: str = Field(default="train_dpo", description="'train_dpo' or 'train_sft' (this run's model), a model "
                       "directory or a hub id")


class JudgePromptsFile(_Section):
    """FastChat's ``judge_prompts.jsonl``, read unchanged (``zephyr_ray/evaluate/fastchat_prompts.py``): its prompts
    replace the project's for grading and pairwise, each where FastChat uses it. Checked when the recipe loads where
    the file is found from there, else when the evaluation runs (Serve loads the recipe from another directory)."""

    path: str

    @model_validator(mode="after")
    def _check_when_found(self) -> JudgePromptsFile:
        if Path(self.path).is_file():
            self.prompts  # noqa: B018 - reads and checks the file now, for the error at load time
        return self

    @functools.cached_property
    def prompts(self) -> dict[str, dict[str, str]]:
        """The file's prompts, read once (at load where the file is found, else when first used)."""
        from .evaluate.fastchat_prompts import read_judge_prompts

        return read_judge_prompts(self.path)


class EvalJudgeConfig(_Section):
    """The evaluation's judge: a vLLM model (``engine``) or an OpenAI-compatible endpoint (GPT-4, as MT-Bench uses)."""

    engine: Engine | None = None
    endpoint: Endpoint | None = None
    sampling: Sampling = Sampling(temperature=0.0, max_tokens=1024)
    structured_output: bool | Literal["grade", "pair"] = Field(
        default=True, description="vLLM judges: constrain the answer to 'explanation, then Rating: [[n]]' (or the "
        "verdict), so it always parses; 'grade' or 'pair': only that kind's answers (a judge that learnt its own "
        "pairwise form, as the tiny world's); endpoints follow their own `structured_output`")
    prompts: JudgePromptsFile | None = Field(default=None, description="FastChat's judge prompts file "
                                             "(judge_prompts.jsonl) instead of the project's prompts")

    @model_validator(mode="after")
    def _one_backend(self) -> EvalJudgeConfig:
        if (self.engine is None) == (self.endpoint is None):
            raise ValueError("give the judge either an `engine` (a vLLM model) or an `endpoint`, not both")
        if self.sampling.max_tokens < 32:
            raise ValueError(f"sampling.max_tokens ({self.sampling.max_tokens}) leaves the judge no room to explain "
                             "before its rating; use 32 or more")
        return self


class MTBenchConfig(_Section):
    """Single-answer grading, MT-Bench style: two-turn questions, the judge rates each answer 1-10."""

    questions: DatasetSource = Field(description="FastChat question.jsonl rows (question_id, category, turns, "
                                     "reference) or HuggingFaceH4/mt_bench_prompts")
    reference_answers: DatasetSource | None = Field(
        default=None, description="FastChat reference answers ({question_id, choices: [{turns}]}): a turn's "
        "reference where they give one (as FastChat grades), the question's inline `reference` elsewhere")
    temperatures: dict[str, float] = Field(default_factory=lambda: dict(MT_BENCH_TEMPERATURES))
    default_temperature: float = Field(default=0.7, ge=0.0, le=5.0)
    max_tokens: int = Field(default=1024, gt=0, description="per answer (MT-Bench: 1024)")
    reference_categories: list[str] = Field(default_factory=lambda: list(MT_BENCH_REFERENCE_CATEGORIES))


class PairwiseConfig(_Section):
    """Pairwise win rate, AlpacaEval style: the judge sees both answers, in both orders; ties allowed."""

    prompts: DatasetSource | None = Field(
        default=None, description="instructions (AlpacaEval's JSON list: instruction, output, generator, dataset); "
        "default: the MT-Bench questions' first turns")
    baseline: EvalModel | None = Field(default=None, description="the model to beat; default: the prompts' `output` "
                                       "(a reference output set such as AlpacaEval's)")
    sampling: Sampling = Field(default=Sampling(temperature=0.7, max_tokens=1024),
                               description="for answers to `prompts` (MT-Bench questions keep their own settings)")
    bootstrap_samples: int = Field(default=2000, ge=100)
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0)


class ExactMatchConfig(_Section):
    """Verifiable evaluation: questions with reference answers, each model's final answer taken out of its reply by
    a stated rule and compared with the reference (``zephyr_ray/evaluate/exact_match.py``)."""

    questions: DatasetSource = Field(description="rows with `question` and `answer`: GSM8K's as they are (the final "
                                     "answer after `####`), or a plain answer")
    answer_pattern: str = Field(default="gsm8k", description="how the final answer is found in a reply: 'gsm8k' "
                                "(after the last ####), 'last_number', or a regular expression (its last match; "
                                "its first group if it has one)")
    models: list[EvalModel] = Field(default_factory=list, description="more models to score besides the evaluated "
                                    "model and the pairwise baseline (e.g. the base model, train_sft)")
    sampling: Sampling = Field(default=Sampling(temperature=0.0, max_tokens=256))
    bootstrap_samples: int = Field(default=2000, ge=100)
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0)

    @field_validator("answer_pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        from .evaluate.exact_match import check_pattern

        return check_pattern(value)


class DecontaminateConfig(_Section):
    """Keep evaluation prompts out of training: training prompts sharing an n-gram (of words, lower-cased) with any
    evaluation prompt are counted before training, and dropped into the rejects when ``drop`` is set."""

    ngram: int = Field(default=8, ge=3, description="words per n-gram (Tulu 3 uses 8, GPT-3 used 13)")
    drop: bool = False


class EvaluateConfig(_Section):
    """Evaluation of the recipe's model on the same judge machinery as the data stages."""

    model: EvalModel = Field(default_factory=lambda: EvalModel(name="dpo"))
    mt_bench: MTBenchConfig | None = None
    pairwise: PairwiseConfig | None = None
    exact_match: ExactMatchConfig | None = None
    judge: EvalJudgeConfig
    decontaminate: DecontaminateConfig | None = None

    @model_validator(mode="after")
    def _something_to_do(self) -> EvaluateConfig:
        if self.mt_bench is None and self.pairwise is None:
            raise ValueError("give `mt_bench`, `pairwise` or both")
        if self.pairwise is not None and self.pairwise.prompts is None and self.mt_bench is None:
            raise ValueError("pairwise.prompts: needed when there is no `mt_bench` question set to take them from")
        if self.pairwise is not None and self.pairwise.baseline is None and self.pairwise.prompts is None:
            raise ValueError("pairwise.baseline: MT-Bench questions have no reference outputs; name a baseline model "
                             "or give `prompts` with an `output` column")
        if self.pairwise and self.pairwise.baseline and self.pairwise.baseline.name == self.model.name:
            raise ValueError(f"pairwise.baseline.name: '{self.model.name}' is already the evaluated model's name")
        if self.judge.prompts is not None and Path(self.judge.prompts.path).is_file():
            self.check_judge_prompts()
        return self

    def check_judge_prompts(self) -> None:
        """The judge prompts file has every prompt this evaluation uses."""
        from .evaluate.fastchat_prompts import check_needed

        if self.judge.prompts is not None:
            check_needed(self.judge.prompts.prompts, self.judge.prompts.path,
                         [use for use in ("mt_bench", "pairwise") if getattr(self, use) is not None])


class ServedModel(_Section):
    """One model behind the endpoint, answering with the chat template saved with it (or ``chat_template``)."""

    model_id: str = Field(default="zephyr", min_length=1, description="the name clients ask for (`model`)")
    model: str | None = Field(default=None, description="model directory or hub id; by default the recipe's final "
                              "model (train_dpo/model, else train_sft/model)")
    max_model_len: int | None = Field(default=None, gt=0, description="default: the model's own limit, at most "
                                      "hardware.max_model_len_cap")
    kv_cache_gib: float | None = Field(default=None, gt=0.0)
    tensor_parallel_size: int = Field(default=1, gt=0)
    trust_remote_code: bool = False
    chat_template: str | None = Field(default=None, description="as an engine's `chat_template`; default: the one "
                                      "saved with the model (trained models carry the recipe's)")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="passed to vLLM as they are")
    _template_file = field_validator("chat_template")(lambda value: read_template_file(value))
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, gt=0)
    target_ongoing_requests: int = Field(default=16, gt=0, description="requests per replica the autoscaler aims "
                                         "for (Ray Serve LLM's own default never scales up)")
    max_ongoing_requests: int = Field(default=64, gt=0, description="requests one replica takes before the proxy "
                                      "queues them")
    upscale_delay_s: float = Field(default=30.0, ge=0.0, description="load held this long before a replica is added")
    downscale_delay_s: float = Field(default=600.0, ge=0.0, description="idle this long before one is removed")

    @model_validator(mode="after")
    def _replicas(self) -> ServedModel:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        if self.target_ongoing_requests > self.max_ongoing_requests:
            raise ValueError(f"target_ongoing_requests ({self.target_ongoing_requests}) exceeds "
                             f"max_ongoing_requests ({self.max_ongoing_requests}): the replicas could never reach it")
        return self

    def engine(self, model: str) -> Engine:
        """The vLLM settings of this model, as the generation stages' engines state them."""
        return Engine(model=model, max_model_len=self.max_model_len, kv_cache_gib=self.kv_cache_gib,
                      tensor_parallel_size=self.tensor_parallel_size, trust_remote_code=self.trust_remote_code,
                      chat_template=self.chat_template, engine_kwargs=self.engine_kwargs)


DIRECT_APP_ARGS = {"api_key", "middleware"}  # vLLM front-end arguments that reach its app's middleware


class ServeConfig(_Section):
    """The OpenAI-compatible endpoint on Ray Serve (``zephyr_ray/serving.py``)."""

    models: list[ServedModel] = Field(default_factory=lambda: [ServedModel()], min_length=1)
    api_key_env: str = Field(default="ZEPHYR_RAY_API_KEY", description="environment variable holding the API key; "
                             "when it is set, every route but /health needs it")
    max_temperature: float = Field(default=2.0, gt=0.0, description="requests above it are refused (OpenAI's bound)")
    max_request_bytes: int = Field(default=1_048_576, gt=0, description="larger request bodies get 413")
    direct_streaming: bool = Field(default=False, description="one model only: requests go straight to the model's "
                                   "replicas, which serve vLLM's own OpenAI app with this section's checks in front "
                                   "(Ray Serve LLM's direct streaming), instead of through an ingress deployment: "
                                   "one hop less; with RAY_SERVE_ENABLE_HA_PROXY=1 in the environment Ray starts "
                                   "with, HAProxy routes instead of Serve's Python proxy")

    @model_validator(mode="after")
    def _unique_ids(self) -> ServeConfig:
        ids = [m.model_id for m in self.models]
        if len(set(ids)) != len(ids):
            raise ValueError(f"model_id must be unique, got {ids}")
        return self

    @model_validator(mode="after")
    def _direct_streaming_fits(self) -> ServeConfig:
        """Direct streaming serves vLLM's own app from one model's replica: one model, and nothing in its
        ``engine_kwargs`` that would change that app behind our guards."""
        if self.direct_streaming and len(self.models) > 1:
            ids = [m.model_id for m in self.models]
            raise ValueError(f"direct_streaming serves one model (Ray Serve LLM's limit), got {len(ids)}: {ids}; "
                             "serve the others in apps of their own or set direct_streaming: false")
        for i, model in enumerate(self.models if self.direct_streaming else []):
            if own := sorted(DIRECT_APP_ARGS & set(model.engine_kwargs)):
                raise ValueError(f"models[{i}].engine_kwargs: {own} would change vLLM's own app, which "
                                 "direct_streaming serves (a second key check, middleware of its own); the key is "
                                 "api_key_env's")
        return self


class PolicyEngine(Engine):
    """The current policy's vLLM settings in a round; its model is set by the round."""

    model: str = Field(default="policy", description="set by each round: the dSFT model for round 1, the previous "
                       "round's dDPO model after")


class RoundsDPO(_Section):
    """What each round's DPO changes of ``train_dpo``: a number for every round, or a list with one per round."""

    num_epochs: float | list[float] | None = None
    learning_rate: float | list[float] | None = None

    def for_round(self, field: str, round_number: int) -> float | None:
        value = getattr(self, field)
        if isinstance(value, list):
            return value[min(round_number, len(value)) - 1]
        return value


class RoundsConfig(_Section):
    """Iterative RLAIF (online / iterative DPO, as OpenRLHF's iterative DPO, RLHFlow and Self-Rewarding LMs): round
    r's policy (dSFT for round 1, round r-1's dDPO after) completes the round's prompts ``samples`` times, the recipe's
    judge scores them, binarize pairs them, and DPO trains from the policy. Outputs in ``rounds/<r>/<stage>/``."""

    count: int = Field(ge=1, le=100, description="how many rounds")
    samples: int = Field(default=4, ge=1, le=64, description="completions per prompt from the current policy")
    sampling: Sampling = Field(default=Sampling(temperature=1.0, max_tokens=512), description="the policy's sampling")
    engine: PolicyEngine = Field(default_factory=PolicyEngine, description="the policy's vLLM settings")
    pool: Literal["replace", "join"] = Field(default="replace", description="replace: only the policy's samples are "
                                             "judged; join: the `complete` pool models answer the round's prompts too")
    prompts: Literal["split", "resample"] = Field(
        default="split", description="split: the `complete` prompts cut into `count` disjoint parts, a fresh part per "
        "round; resample: `prompts_per_round` of them drawn again every round")
    prompts_per_round: int | None = Field(default=None, gt=0, description="resample: how many (default: all)")
    rejected: Literal["lowest", "random"] = Field(default="lowest", description="the rejected completion: the "
                                                  "lowest-scored (best vs worst, as iterative DPO does) or random")
    reference: Literal["previous", "sft"] = Field(default="previous", description="DPO's frozen reference in "
                                                  "round r: the policy it starts from, or always the dSFT model")
    dpo: RoundsDPO = Field(default_factory=RoundsDPO)
    evaluate: bool = Field(default=True, description="exact match and the win rate against dSFT after each round "
                           "(the recipe's `evaluate` section, the round's model against the dSFT model)")
    seed: int = 0

    @model_validator(mode="after")
    def _something_to_pair(self) -> RoundsConfig:
        if self.pool == "replace" and self.samples < 2:
            raise ValueError("samples: with pool: replace, the policy's samples are all there is to pair: 2 or more")
        return self

    @model_validator(mode="after")
    def _lists_fit(self) -> RoundsConfig:
        for field in ("num_epochs", "learning_rate"):
            value = getattr(self.dpo, field)
            if isinstance(value, list) and len(value) != self.count:
                raise ValueError(f"dpo.{field}: give one value per round ({self.count}), got {len(value)}")
        return self

    def prompts_a_round(self, total: int) -> int:
        """How many of ``total`` prompts a round asks: ``prompts_per_round`` (at most all) when resampled; when split,
        about ``total / count`` (the split goes by a hash of each prompt id)."""
        if self.prompts == "split":
            return total // self.count
        return min(self.prompts_per_round or total, total)


class Recipe(_Section):
    """A whole Zephyr-style run: what to train, on what, with which settings."""

    name: str
    description: str = ""
    hardware: Hardware = Hardware()
    synthesize: SynthesizeConfig | None = None
    train_sft: TrainSFTConfig | None = None
    complete: CompleteConfig | None = None
    judge: JudgeConfig | None = None
    binarize: BinarizeConfig | None = None
    train_dpo: TrainDPOConfig | None = None
    evaluate: EvaluateConfig | None = None
    rounds: RoundsConfig | None = None
    serve: ServeConfig | None = None

    @model_validator(mode="after")
    def _scores_exist(self) -> Recipe:
        if (self.judge and self.binarize and self.judge.kind in ("logprob", "reward_model")
                and self.binarize.score != "overall"):
            raise ValueError(f"binarize.score: a '{self.judge.kind}' judge gives one overall score, not aspects; "
                             "set binarize.score: overall")
        return self

    @model_validator(mode="after")
    def _rounds_have_their_stages(self) -> Recipe:
        if self.rounds is not None:
            missing = [name for name in ("train_sft", "complete", "judge", "binarize", "train_dpo")
                       if getattr(self, name) is None]
            if missing:
                raise ValueError(f"rounds: the recipe needs {missing} (each round runs complete, judge, binarize and "
                                 "train_dpo from the dSFT model)")
            if self.complete.prompts is None:
                raise ValueError("rounds: complete.prompts are the prompts the rounds draw from")
            policy = {"policy"} | {f"policy-{i}" for i in range(1, self.rounds.samples + 1)}
            taken = sorted(policy & {n for m in self.complete.models for n in m.sample_names()})
            if self.rounds.pool == "join" and taken:
                raise ValueError(f"rounds.pool: pool completions named {taken} would share the policy's samples' "
                                 "names (policy, policy-<i>): rename the pool model")
            if self.rounds.evaluate and self.evaluate is None:
                raise ValueError("rounds.evaluate: the recipe has no `evaluate` section to evaluate each round with")
        return self

    @model_validator(mode="after")
    def _batches_divide(self) -> Recipe:
        problems = batch_problems(self.model_dump())
        if problems:
            key, message = problems[0]
            raise ValueError(f"{key}: {message}")
        return self


def batch_problems(data: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, message) for each training stage whose global batch cannot be split over the workers.

    Works on raw recipe data too, so this check still reports when other keys of the recipe are invalid.
    """
    hardware = data.get("hardware") or {}
    workers = hardware.get("num_workers", Hardware().num_workers) if isinstance(hardware, dict) else None
    problems = []
    for stage in ("train_sft", "train_dpo"):
        section = data.get(stage)
        if not isinstance(section, dict):
            continue
        sizes = tuple(_as_count(n) for n in (section.get("global_batch_size"), workers,
                                             section.get("max_per_device_batch_size", 8)))
        if not all(isinstance(n, int) and n > 0 for n in sizes):
            continue  # reported as a field error
        try:
            derive_batch(*sizes)
        except ValueError as err:
            problems.append((f"{stage}.global_batch_size", str(err)))
    return problems


_INT = TypeAdapter(int)


def _as_count(value: Any) -> int | None:
    """``value`` read as the recipe's integer fields read it (pydantic's lax mode: ``3.0`` and ``"3"`` are 3), or
    None where those fields reject it, so the raw-data batch check sees what the validated recipe would."""
    try:
        return _INT.validate_python(value)
    except ValidationError:
        return None


def derive_batch(global_batch_size: int, num_workers: int, max_per_device: int) -> tuple[int, int]:
    """(per-device batch, gradient accumulation steps) such that per_device * accumulation * workers == global.

    The per-device batch is the largest divisor of the per-worker share that fits ``max_per_device``, so a recipe
    means the same optimisation on 2 CPU workers and on 16 GPUs.
    """
    if num_workers <= 0 or global_batch_size <= 0 or max_per_device <= 0:
        raise ValueError("batch sizes and worker count must be positive")
    if global_batch_size % num_workers:
        raise ValueError(
            f"global_batch_size {global_batch_size} does not divide over {num_workers} workers; "
            f"use a multiple of {num_workers}"
        )
    per_worker = global_batch_size // num_workers
    per_device = max(d for d in range(1, min(per_worker, max_per_device) + 1) if per_worker % d == 0)
    return per_device, per_worker // per_device


class RecipeError(ValueError):
    """A recipe that does not load; ``problems`` holds one ``file:line: key.path: message`` line per mistake."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def _key_places(node: yaml.Node, file: str, duplicates: list[str], path: tuple = ()) -> dict[tuple, tuple[str, int]]:
    """Map every key path in a YAML document to (file, 1-based line), to point errors at the right place; a key
    repeated in one mapping goes to ``duplicates`` (YAML keeps the last silently, so the first would be lost)."""
    places = {path: (file, node.start_mark.line + 1)}
    if isinstance(node, yaml.MappingNode):
        first: dict[Any, int] = {}
        for key, value in node.value:
            line = key.start_mark.line + 1
            if key.value in first:
                duplicates.append(f"{file}:{line}: {'.'.join(str(p) for p in path + (key.value,))}: duplicate key "
                                  f"(also at line {first[key.value]}; only one of them would count)")
            first.setdefault(key.value, line)
            places.update(_key_places(value, file, duplicates, path + (key.value,)))
            places[path + (key.value,)] = (file, line)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            places.update(_key_places(item, file, duplicates, path + (i,)))
    return places


def _recipe_key_places(path: Path) -> dict[tuple, tuple[str, int]]:
    """``_key_places`` over a recipe and its ``base:`` chain: a key is where the file that sets it last has it."""
    places: dict[tuple, tuple[str, int]] = {}
    duplicates: list[str] = []
    files = recipe_files(path)
    for file in reversed(files):
        node = yaml.compose(file.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
        if node is not None:
            places.update(_key_places(node, str(path) if file == files[0] else str(file), duplicates))
    if duplicates:
        raise RecipeError(duplicates)
    return places


def _clean_loc(loc: tuple) -> tuple:
    # pydantic adds the model validator's name or the union member's type to ``loc``; keep real keys only
    return tuple(p for p in loc if not (isinstance(p, str) and (p[:1].isupper() or p.startswith("function-"))))


def _place_of(loc: tuple, places: dict[tuple, tuple[str, int]]) -> tuple[str, int] | None:
    loc = _clean_loc(loc)
    return next((places[loc[:n]] for n in range(len(loc), -1, -1) if loc[:n] in places), None)


def _format_error(file: str, error: dict[str, Any], places: dict[tuple, tuple[str, int]]) -> str:
    loc = _clean_loc(tuple(error["loc"]))
    place = _place_of(loc, places)
    key = ".".join(str(p) for p in loc) or "(top level)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    elif error["type"] == "missing":
        message = "missing required key"
    elif error["type"] not in ("missing",) and "input" in error and not isinstance(error["input"], (dict, list)):
        message += f" (got {error['input']!r})"
    where = f"{place[0]}:{place[1]}" if place else file
    return f"{where}: {key}: {message}"


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe YAML; raises ``RecipeError`` listing every problem, each naming file and key."""
    try:
        return _load_recipe(path)
    except RecipeError:
        raise
    except RecursionError:  # YAML nested thousands deep, or an alias inside itself (`a: &a [*a]`)
        raise RecipeError([f"{path}: invalid YAML: nested too deeply, or an alias that contains itself"]) from None
    except ValueError as err:  # e.g. an integer of more than 4300 digits
        raise RecipeError([f"{path}: invalid YAML: {err}"]) from None


def _load_recipe(path: str | Path) -> Recipe:
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError([f"{file}: no such file"]) from None
    except UnicodeDecodeError as err:
        raise RecipeError([f"{file}: not UTF-8 text ({err.reason} at byte {err.start})"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark else file
        raise RecipeError([f"{where}: invalid YAML: {getattr(err, 'problem', None) or err}"]) from None
    if not isinstance(data, dict):
        raise RecipeError([f"{file}: a recipe is a mapping of sections, got {type(data).__name__}"])
    data = _with_base(data, Path(path))
    places = _recipe_key_places(Path(path))  # raises on a duplicate key, here or in a base
    try:
        return Recipe.model_validate(data)
    except ValidationError as err:
        errors = [e for e in err.errors() if e["loc"]]
        # whole-recipe checks raise "key.path: message"; point them at their key. The batch check is redone below
        # on the raw data, because pydantic skips whole-recipe checks when a field is invalid.
        for error in err.errors():
            key, _, message = error["msg"].removeprefix("Value error, ").partition(": ")
            if not error["loc"] and not key.endswith(".global_batch_size"):
                errors.append({"loc": tuple(key.split(".")), "msg": message, "type": "value_error"})
        errors += [{"loc": tuple(key.split(".")), "msg": message, "type": "value_error"}
                   for key, message in batch_problems(data)]
        problems = [(_place_of(e["loc"], places) or (file, 0), _format_error(file, e, places)) for e in errors]
        # the recipe's own problems first, then its bases', each file's in line order
        problems.sort(key=lambda p: (p[0][0] != file, p[0]))
        raise RecipeError([text for _, text in problems]) from None


def recipe_files(path: str | Path) -> list[Path]:
    """The recipe file and the files its ``base:`` chain names, the recipe's own first."""
    files = [Path(path)]
    while True:
        try:
            data = yaml.safe_load(files[-1].read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return files
        base = data.get("base") if isinstance(data, dict) else None
        if not isinstance(base, str) or len(files) > 16:
            return files
        files.append(files[-1].parent / base)


def _with_base(data: dict[str, Any], path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe with ``base: <file>`` (relative to the recipe's directory) is that recipe with this one's keys laid
    over it, section by section (mappings merge, other values replace, ``_laid_over``): a variant names only what it
    changes."""
    base = data.pop("base", None)
    if base is None:
        return data
    base_path = path.parent / str(base)
    if not isinstance(base, str) or not base_path.is_file():
        raise RecipeError([f"{path}: base: {base!r} is not a recipe file (paths are relative to {path.parent})"])
    if base_path.resolve() in seen:
        raise RecipeError([f"{path}: base: {base} names a recipe that is already its base (a cycle)"])
    try:
        base_data = yaml.safe_load(base_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise RecipeError([f"{base_path}: cannot read it as the base of {path}: {err}"]) from None
    if not isinstance(base_data, dict):
        raise RecipeError([f"{base_path}: a recipe is a mapping of sections, got {type(base_data).__name__}"])
    return _laid_over(_with_base(base_data, base_path, (*seen, path.resolve())), data)


# What a variant's change leaves meaningless in its base, so the merge drops it unless the variant sets it too: a
# judge given an `endpoint` no longer runs the base's `engine` (and the reverse), and a feedback judge of another
# `kind` is not asked with the prompt written for the base's kind (a reward model takes none).
_ALTERNATIVE_KEYS = ("engine", "endpoint")
_JUDGE_PROMPT_KEYS = ("prompt", "system_prompt")


def _laid_over(base: dict[str, Any], changes: dict[str, Any], section: tuple[str, ...] = ()) -> dict[str, Any]:
    merged = dict(base)
    for named, other in (_ALTERNATIVE_KEYS, _ALTERNATIVE_KEYS[::-1]):
        if changes.get(named) is not None and other not in changes:
            merged.pop(other, None)
    if section == ("judge",) and "kind" in changes \
            and changes["kind"] != base.get("kind", JudgeConfig.model_fields["kind"].default):
        for key in _JUDGE_PROMPT_KEYS:
            if key not in changes:
                merged.pop(key, None)
    for key, value in changes.items():
        merged[key] = (_laid_over(base[key], value, (*section, key))
                       if isinstance(value, dict) and isinstance(base.get(key), dict) else value)
    return merged


def _walk(value: Any, path: tuple = ()):
    """Yield (key path, value) for every leaf and section of a recipe."""
    yield path, value
    if isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _walk(getattr(value, name), path + (name,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _walk(item, path + (i,))


def check_recipe_paths(recipe: Recipe, file: str) -> tuple[list[str], list[str]]:
    """Check every dataset and model a recipe names: (problems, notes). Hub ids are noted, not fetched."""
    from .data import DATA_SUFFIXES, is_hub_id
    from .engines import check_model_dir, engine_problems

    problems: list[str] = [f"{file}: {p}" for p in engine_problems(recipe, "", recipe.hardware, fetch=False)]
    notes: list[str] = []
    for path, value in _walk(recipe):
        key = ".".join(str(p) for p in path)
        if isinstance(value, Endpoint) and value.api_key_env and not os.environ.get(value.api_key_env):
            notes.append(f"{key}.api_key_env: {value.api_key_env} is not set here (it must be where the stage runs)")
        if isinstance(value, DatasetSource):
            target, kind = value.path, "dataset"
        elif isinstance(value, EvalModel) and value.model in RUN_MODELS:
            notes.append(f"{key}.model: {value.model} is this run's {value.model} model")
            continue
        elif isinstance(value, PolicyEngine):
            notes.append(f"{key}.model: each round's policy (the dSFT model, then the previous round's dDPO model)")
            continue
        elif isinstance(value, (Engine, Training, ServeConfig)) and getattr(value, "model", None):
            target, kind = value.model, "model"
        else:
            continue
        if is_hub_id(target):
            notes.append(f"{key}: {kind} {target} is a hub id (fetched when the stage runs)")
        elif kind == "dataset":
            local = Path(target).expanduser()
            if not local.exists():
                problems.append(f"{file}: {key}.path: no such file or directory: {target}")
            elif local.is_file() and local.suffix not in DATA_SUFFIXES:
                problems.append(f"{file}: {key}.path: not a .jsonl, .json or .parquet file: {target}")
        else:
            problems += [f"{file}: {key}.model: {p}" for p in check_model_dir(target)]
    return problems, notes
