"""The ``zephyr-ray`` command. Each command composes library functions; user mistakes print one line each."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from .console import echo, log_path_for, quiet_console, terminal

app = typer.Typer(
    name="zephyr-ray",
    help="Align chat models with AI feedback, the Zephyr way, on Ray (data synthesis, dSFT, judging, dDPO, serving).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _fail(lines: list[str] | str, code: int = 2) -> None:
    for line in [lines] if isinstance(lines, str) else lines:
        echo(f"error: {line}", err=True)
    raise typer.Exit(code)


def _recipe_or_fail(path: Path):
    """The recipe at ``path``, or exit with one error line per problem (file, line, key)."""
    from .config import RecipeError, load_recipe

    try:
        return load_recipe(path)
    except RecipeError as err:
        _fail(err.problems)


def _quiet(log_path: Path, verbose: bool) -> None:
    """Library output to ``log_path`` from here on (``--verbose``: on the terminal), our own lines on the terminal."""
    if quiet_console(log_path, verbose):
        logging.getLogger(__name__).info("library logs: %s", log_path)


VERBOSE = Annotated[bool, typer.Option("--verbose", help="show the libraries' logs (vLLM, Ray, DeepSpeed) here "
                                       "instead of in the log file")]


@app.command("tiny-models")
def tiny_models(
    out_dir: Annotated[Path, typer.Argument(help="directory to write the models into (one subdirectory each)")],
    only: Annotated[list[str] | None, typer.Option("--only", help="build only these models")] = None,
    overwrite: Annotated[bool, typer.Option(help="rebuild models that already exist")] = False,
    verbose: VERBOSE = False,
) -> None:
    """Build the tiny Mistral-architecture models (teacher, generator pool, judge, student) for tests and the demo."""
    from .tiny import TINY_MODELS, build_tiny_models

    _quiet(log_path_for(None, "tiny-models"), verbose)
    try:
        built = build_tiny_models(out_dir, names=only, overwrite=overwrite)
    except ValueError as err:
        _fail(str(err))
    roles = {s.name: s.role for s in TINY_MODELS}
    for name, path in built.items():
        echo(f"{roles[name]:>9}  {path}")


@app.command()
def validate(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML")],
    skip_paths: Annotated[bool, typer.Option(help="check the YAML only, not the datasets and models it names")] = False,
) -> None:
    """Check a recipe: every key, type and value, and that its local datasets and models exist."""
    from .config import RecipeError, check_recipe_paths, load_recipe

    try:
        loaded = load_recipe(recipe)
    except RecipeError as err:
        _fail(err.problems)
    problems, notes = ([], []) if skip_paths else check_recipe_paths(loaded, str(recipe))
    for note in notes:
        echo(f"note: {note}")
    if problems:
        _fail(problems)
    stages = [name for name in (*STAGES, "serve") if getattr(loaded, name) is not None]
    if loaded.rounds is not None:
        stages[stages.index("rounds")] = f"rounds ({loaded.rounds.count})"
    echo(f"{recipe}: ok ({loaded.name}; stages: {', '.join(stages)})")


@app.command()
def chat(
    model_dir: Annotated[str, typer.Argument(help="model directory (or hub id) with a chat template")],
    message: Annotated[str | None, typer.Option("--message", "-m", help="send one message, print the reply, exit")] = None,
    system: Annotated[str | None, typer.Option(help="system prompt")] = None,
    max_tokens: Annotated[int, typer.Option(min=1)] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, max=5.0)] = 0.7,
    seed: Annotated[int | None, typer.Option(help="sampling seed, for repeatable replies")] = None,
    max_model_len: Annotated[int | None, typer.Option(min=16, help="default: the model's own limit, at most "
                                                      "8192")] = None,
    kv_cache_gib: Annotated[float | None, typer.Option(help="KV cache size (default: the engine's own rule)")] = None,
    verbose: VERBOSE = False,
) -> None:
    """Chat with a model through a real vLLM engine, behind the model's own chat template."""
    from .chat import prompt_template
    from .config import Engine, Hardware
    from .data import is_hub_id
    from .engines import check_model_dir, context_length, detect_accelerator, local_llm

    if not is_hub_id(model_dir) and (problems := check_model_dir(model_dir)):
        _fail(problems)
    _quiet(log_path_for(None, "chat"), verbose)
    from vllm import SamplingParams

    hardware = Hardware(accelerator=detect_accelerator())
    try:
        context_length(Engine(model=model_dir, max_model_len=max_model_len), hardware)
    except ValueError as err:
        _fail(f"--max-model-len: {err}")
    llm = local_llm(model_dir, hardware, max_model_len=max_model_len, kv_cache_gib=kv_cache_gib)
    template = prompt_template(llm.get_tokenizer())  # as the other paths render (vLLM encodes it as they do)
    sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    conversation = [{"role": "system", "content": system}] if system else []

    def reply(text: str) -> str:
        conversation.append({"role": "user", "content": text})
        out = llm.chat([conversation], sampling, chat_template=template, use_tqdm=False)[0].outputs[0]
        conversation.append({"role": "assistant", "content": out.text})
        # shown without the blank lines a model may start or end with (kept in the conversation as it said them)
        shown = out.text.strip() or "(an empty reply)"
        return shown + ("" if out.finish_reason == "stop" else f"  [{out.finish_reason}]")

    if message is not None:
        echo(reply(message))
        return
    echo(f"chatting with {model_dir} (/reset clears the conversation, /exit or Ctrl-D quits)")
    for line in _input_lines():
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            del conversation[1 if system else 0:]
            continue
        if text:
            echo(f"assistant> {reply(text)}")


STAGES = ("synthesize", "train_sft", "complete", "judge", "binarize", "train_dpo", "evaluate", "rounds")


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help=f"one of: {', '.join(STAGES)}")],
    recipe: Annotated[Path, typer.Argument(help="recipe YAML")],
    run_dir: Annotated[Path | None, typer.Option(help="where the run's outputs go (default: runs/<recipe name>, "
                                                 "as for run and evaluate)")] = None,
    address: Annotated[str | None, typer.Option(help="Ray address (default: a running cluster, else a local one)")] = None,
    verbose: VERBOSE = False,
) -> None:
    """Run one stage of a recipe; a stage whose output is complete is skipped, a partial one redone."""
    from .stages import run_stage

    if name not in STAGES:
        _fail(f"unknown stage '{name}'; choose from {', '.join(STAGES)}")
    loaded = _recipe_or_fail(recipe)
    run_dir = run_dir or Path("runs") / loaded.name
    _quiet(log_path_for(run_dir, f"stage-{name}"), verbose)
    try:
        result = run_stage(name, loaded, run_dir, address=address)
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        _fail(str(err))
    echo(json.dumps(dataclasses.asdict(result), indent=2, default=str))


@app.command()
def evaluate(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML with an `evaluate` section")],
    run_dir: Annotated[Path | None, typer.Option(help="the run to evaluate (default: runs/<recipe name>)")] = None,
    address: Annotated[str | None, typer.Option(help="Ray address (default: a running cluster, else a local one)")] = None,
    export: Annotated[Path | None, typer.Option(help="also write the answers and judgments in FastChat's and "
                                                "AlpacaEval's formats into this directory")] = None,
    verbose: VERBOSE = False,
) -> None:
    """Grade the recipe's model MT-Bench style and measure its pairwise win rate (the recipe's `evaluate` stage)."""
    from .evaluate import evaluation_summary
    from .stages import run_stage

    loaded = _recipe_or_fail(recipe)
    if loaded.evaluate is None:
        _fail(f"{recipe}: no `evaluate` section")
    run_dir = run_dir or Path("runs") / loaded.name
    _quiet(log_path_for(run_dir, "evaluate"), verbose)
    try:
        result = run_stage("evaluate", loaded, run_dir, address=address)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    results = json.loads(Path(result.outputs["results"]).read_text())
    echo(evaluation_summary(results))
    echo(f"results: {result.outputs['results']}, judgments: {result.outputs['judgments']}")
    if export is not None:
        from .evaluate.official_formats import export_evaluation

        judge = loaded.evaluate.judge
        judge_model = judge.endpoint.model if judge.endpoint is not None else Path(judge.engine.model).name
        for path in export_evaluation(run_dir, export, judge_model):
            echo(f"exported: {path}")


@app.command("serve")
def serve_model(
    model_dir: Annotated[str, typer.Argument(help="model directory (or hub id) with a chat template")],
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    host: Annotated[str, typer.Option(help="interface to listen on (0.0.0.0: every one)")] = "127.0.0.1",
    model_id: Annotated[str | None, typer.Option(help="the name clients ask for (default: the directory's)")] = None,
    recipe: Annotated[Path | None, typer.Option(help="take the serve and hardware sections from this recipe")] = None,
    max_model_len: Annotated[int | None, typer.Option(min=16, help="default: the model's own limit, at most "
                                                      "8192")] = None,
    kv_cache_gib: Annotated[float | None, typer.Option(help="KV cache size (default: the engine's own rule)")] = None,
    address: Annotated[str | None, typer.Option(help="Ray address (default: a running cluster, else a local one)")] = None,
    verbose: VERBOSE = False,
) -> None:
    """Serve a model on Ray Serve: OpenAI-compatible API, chat page at /; prints the URL and a curl line to try."""
    import time

    from .config import Hardware, RecipeError, ServeConfig, ServedModel, load_recipe
    from .engines import context_length, detect_accelerator
    from .serving import curl_example, refuse_a_port_in_use, serve_locally
    from .stages import init_ray, starts_a_ray_of_its_own

    try:
        loaded = load_recipe(recipe) if recipe else None
    except RecipeError as err:
        _fail(err.problems)
    config = (loaded.serve if loaded and loaded.serve else None) or ServeConfig()
    first = config.models[0]
    changes = {"model": model_dir, "model_id": model_id or (first.model_id if loaded else Path(model_dir).name)}
    if max_model_len is not None:
        changes["max_model_len"] = max_model_len
    if kv_cache_gib is not None:
        changes["kv_cache_gib"] = kv_cache_gib
    config = config.model_copy(update={"models": [ServedModel.model_validate({**first.model_dump(), **changes})]})
    hardware = loaded.hardware if loaded else Hardware(accelerator=detect_accelerator(), num_workers=1)
    try:  # before Ray starts: Serve would retry a replica whose engine cannot start, again and again
        context_length(config.models[0].engine(model_dir), hardware)
    except ValueError as err:
        _fail(f"{'--max-model-len' if max_model_len else f'{recipe}: serve.models[0].max_model_len'}: {err}")
    _quiet(log_path_for(None, "serve"), verbose)
    if starts_a_ray_of_its_own(address):  # a port in use, said before a whole Ray starts (serve_locally asks again)
        try:
            refuse_a_port_in_use(host, port)
        except ValueError as err:
            _fail(str(err))
    # Serve's controller, a detached actor, hands its runtime_env to every later app's replicas: no worker
    # hook for it (served models get absolute paths instead)
    joined = init_ray(hardware, address, workers_here=False)
    try:
        url = serve_locally(config, hardware, host=host, port=port)
    except (ValueError, FileNotFoundError) as err:
        _fail(str(err))
    key_env = config.api_key_env if os.environ.get(config.api_key_env) else None
    echo(f"\nserving '{config.models[0].model_id}' at {url}/v1 (chat page: {url}/)"
               f"{f'; API key required ({key_env})' if key_env else '; no API key set: open to anyone who can reach it'}")
    echo(f"try:\n  {curl_example(url, config.models[0].model_id, key_env)}\nCtrl-C stops it.")
    try:
        while True:
            time.sleep(3600)
    finally:
        from ray import serve

        from .serving import APP_NAME

        if joined:  # a cluster others use may serve other apps: Serve stays up for them
            serve.delete(APP_NAME)
        if not joined or not serve.status().applications:
            serve.shutdown()


def _stage_table(manifest: dict) -> str:
    """One line per stage of a run manifest: name, status, seconds (a skipped stage's are those of the run that
    did it, and say so: skipping takes no time)."""
    width = max((len(stage) for stage in manifest["stages"]), default=0)  # rounds/<r>/<stage> too

    def line(stage: str, record: dict) -> str:
        seconds = record.get("seconds")
        if record["status"] == "skipped":
            return f"{stage:<{width}} skipped" + (f"  (done before, in {seconds:.1f}s)" if seconds is not None else "")
        return f"{stage:<{width}} {record['status']:<8} {seconds or 0:8.1f}s"

    return "\n".join(line(stage, record) for stage, record in manifest["stages"].items())


@app.command("run")
def run_recipe_command(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML")],
    run_dir: Annotated[Path | None, typer.Option(help="where the run's outputs go (default: runs/<recipe name>)")] = None,
    address: Annotated[str | None, typer.Option(help="Ray address (default: a running cluster, else a local one)")] = None,
    verbose: VERBOSE = False,
) -> None:
    """Run every stage of a recipe in order; finished stages are skipped, so the same command resumes a run."""
    from .run import MANIFEST, run_recipe

    loaded = _recipe_or_fail(recipe)
    run_dir = run_dir or Path("runs") / loaded.name
    _quiet(log_path_for(run_dir, "run"), verbose)
    try:
        manifest = run_recipe(recipe, run_dir, address=address)
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        _fail(str(err))
    echo(_stage_table(manifest))
    echo(f"run manifest: {run_dir / MANIFEST}")


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="a run directory (of `zephyr-ray run` or single stages)")],
    out: Annotated[Path | None, typer.Option(help="where to write the HTML (default: RUN_DIR/report.html)")] = None,
) -> None:
    """Write a self-contained HTML report of a run: data funnel, judge scores, lengths, loss curves, timings."""
    from .report import write_report

    try:
        path = write_report(run_dir, out)
    except FileNotFoundError as err:
        _fail(str(err))
    echo(f"report: {path}")


def _input_lines():
    """Lines typed at a prompt (until Ctrl-D), or piped in on stdin."""
    if not sys.stdin.isatty():
        yield from sys.stdin
        return
    while True:
        terminal().write("you> ")  # not input(): stdout may be the log file
        terminal().flush()
        line = sys.stdin.readline()
        if not line:  # Ctrl-D
            return
        yield line


@app.command()
def plan(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML")],
    cluster: Annotated[Path | None, typer.Option(help="Ray cluster launcher config (cluster.yaml): its GPU node "
                                                      "type, how many, and prices")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the plan as JSON")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="print the table docs/cluster.md shows")] = False,
) -> None:
    """What the recipe will ask of the cluster, per stage (engines or workers, GPUs used of GPUs available, rows
    and tokens, hours, cost, memory per GPU, disk) and the problems found; nothing runs. The throughput and size
    figures it assumes, and where each comes from, are in the --json output."""
    from .plan import cluster_from_yaml, default_cluster, plan_json, plan_markdown, plan_recipe, plan_text

    loaded = _recipe_or_fail(recipe)
    try:
        target = cluster_from_yaml(cluster) if cluster else default_cluster(loaded.hardware)
    except (OSError, ValueError, KeyError, TypeError) as err:
        _fail(f"{cluster}: {err}")
    try:
        plans = plan_recipe(loaded, target)
    except (OSError, ValueError) as err:  # a dataset the stage could not read either: say which, as the stage would
        _fail(str(err))
    if as_json:
        echo(json.dumps(plan_json(plans), indent=2))
    elif markdown:
        echo(plan_markdown(plans))
    else:
        echo(plan_text(plans))


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="where the tiny models go")] = Path("artifacts"),
    run_dir: Annotated[Path, typer.Option(help="where the tiny recipe's run goes")] = Path("runs/tiny-cpu"),
    message: Annotated[str, typer.Option("--message", "-m", help="what to ask the aligned model (by default a "
                                         "creature whose colour the base model's web text mostly gets wrong)")] =
        "Which color does the fema have?",
    recipe: Annotated[bool, typer.Option(help="run the tiny recipe (--no-recipe: build the models and chat with "
                                               "the teacher only, a one-minute check)")] = True,
    verbose: VERBOSE = False,
) -> None:
    """Build the tiny models, run the whole tiny recipe (synthesize, dSFT, four pool models' completions, judge,
    binarize, dDPO, evaluate) on a local Ray, write its HTML report, and ask the aligned model one question."""
    from .report import example_pairs, write_report
    from .run import run_recipe

    models = workdir / "tiny-models"
    _quiet(log_path_for(run_dir, "demo"), verbose)
    tiny_models(models, verbose=verbose)
    if not recipe:
        echo(f"\nuser> {message}")
        chat(str(models / "teacher"), message=message, system=None, max_tokens=64, temperature=0.0,
             seed=0, max_model_len=None, kv_cache_gib=0.5, verbose=verbose)
        return
    jobs = Path(__file__).resolve().parents[1] / "jobs"
    if not (jobs / "configs" / "tiny-cpu.yaml").is_file():
        _fail(f"{jobs}/configs/tiny-cpu.yaml not found: the demo recipe lives in the repository checkout")
    text = (jobs / "configs" / "tiny-cpu.yaml").read_text()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "recipe.yaml"  # the recipe with this checkout's paths
    path.write_text(text.replace("./artifacts/tiny-models", str(models.resolve())).replace(
        "./jobs/data/", f"{jobs / 'data'}/"))
    echo(f"\n== the tiny recipe, end to end, into {run_dir} (about 7 minutes on 2 cores; run again, it skips "
               "what is finished)")
    manifest = run_recipe(path, run_dir)
    echo("\n" + _stage_table(manifest))
    for pair in example_pairs(run_dir, limit=1):
        echo(f"\nA preference pair (judge scores {pair['score_chosen']:g} vs {pair['score_rejected']:g}):\n"
                   f"  prompt:   {pair['prompt']!r}\n  chosen:   {pair['chosen'][-1]['content'][:200]!r} "
                   f"({pair['chosen_model']})\n  rejected: {pair['rejected'][-1]['content'][:200]!r} "
                   f"({pair['rejected_model']})")
    results = run_dir / "evaluate" / "results.json"
    if results.is_file():
        from .evaluate import evaluation_summary

        echo(f"\nEvaluation (tiny judge; {results}):\n{evaluation_summary(json.loads(results.read_text()))}")
    echo(f"\nreport: {write_report(run_dir)}")
    aligned = run_dir / "train_dpo" / "model"
    echo(f"\nThe aligned model ({aligned}), through vLLM behind the Zephyr template:\nuser> {message}")
    chat(str(aligned), message=message, system=None, max_tokens=64, temperature=0.0, seed=0, max_model_len=None,
         kv_cache_gib=0.5, verbose=verbose)
    echo(f"\nnext: zephyr-ray serve {aligned} (OpenAI API and a chat page), zephyr-ray chat {aligned}")


def main(argv: list[str] | None = None) -> None:
    """The ``zephyr-ray`` command (and the ``jobs/`` entrypoints): this process' output is the command's to route."""
    from . import console

    console.owns_process = True
    try:
        app(argv)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
