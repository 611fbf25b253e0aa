"""The ``zephyr-ray`` command. Each command composes library functions; user mistakes print one line each."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    name="zephyr-ray",
    help="Align chat models with AI feedback, the Zephyr way, on Ray (data synthesis, dSFT, judging, dDPO, serving).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _fail(lines: list[str] | str, code: int = 2) -> None:
    for line in [lines] if isinstance(lines, str) else lines:
        typer.echo(f"error: {line}", err=True)
    raise typer.Exit(code)


def _quiet_engines(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not verbose:
        import warnings

        warnings.filterwarnings("ignore")
        os.environ.setdefault("PYTHONWARNINGS", "ignore")  # the engine's own processes too
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@app.command("tiny-models")
def tiny_models(
    out_dir: Annotated[Path, typer.Argument(help="directory to write the models into (one subdirectory each)")],
    only: Annotated[Optional[list[str]], typer.Option("--only", help="build only these models")] = None,
    overwrite: Annotated[bool, typer.Option(help="rebuild models that already exist")] = False,
) -> None:
    """Build the tiny Mistral-architecture models (teacher, generator pool, judge, student) for tests and the demo."""
    from .tiny import TINY_MODELS, build_tiny_models

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        built = build_tiny_models(out_dir, names=only, overwrite=overwrite)
    except ValueError as err:
        _fail(str(err))
    roles = {s.name: s.role for s in TINY_MODELS}
    for name, path in built.items():
        typer.echo(f"{roles[name]:>9}  {path}")


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
        typer.echo(f"note: {note}")
    if problems:
        _fail(problems)
    stages = [name for name in ("synthesize", "train_sft", "complete", "judge", "binarize", "train_dpo", "evaluate",
                                "serve") if getattr(loaded, name) is not None]
    typer.echo(f"{recipe}: ok ({loaded.name}; stages: {', '.join(stages)})")


@app.command()
def chat(
    model_dir: Annotated[str, typer.Argument(help="model directory (or hub id) with a chat template")],
    message: Annotated[Optional[str], typer.Option("--message", "-m", help="send one message, print the reply, exit")] = None,
    system: Annotated[Optional[str], typer.Option(help="system prompt")] = None,
    max_tokens: Annotated[int, typer.Option(min=1)] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, max=5.0)] = 0.7,
    seed: Annotated[Optional[int], typer.Option(help="sampling seed, for repeatable replies")] = None,
    max_model_len: Annotated[int, typer.Option(min=16)] = 512,
    kv_cache_gib: Annotated[Optional[float], typer.Option(help="KV cache size (default: the engine's own rule)")] = None,
    verbose: Annotated[bool, typer.Option(help="show engine logs")] = False,
) -> None:
    """Chat with a model through a real vLLM engine, behind the model's own chat template."""
    from .config import Hardware
    from .data import is_hub_id
    from .engines import check_model_dir, detect_accelerator, local_llm

    if not is_hub_id(model_dir) and (problems := check_model_dir(model_dir)):
        _fail(problems)
    _quiet_engines(verbose)
    from vllm import SamplingParams

    llm = local_llm(model_dir, Hardware(accelerator=detect_accelerator()), max_model_len=max_model_len,
                    kv_cache_gib=kv_cache_gib)
    sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    conversation = [{"role": "system", "content": system}] if system else []

    def reply(text: str) -> str:
        conversation.append({"role": "user", "content": text})
        out = llm.chat([conversation], sampling, use_tqdm=False)[0].outputs[0]
        conversation.append({"role": "assistant", "content": out.text})
        return out.text + ("" if out.finish_reason == "stop" else f"  [{out.finish_reason}]")

    if message is not None:
        typer.echo(reply(message))
        return
    typer.echo(f"chatting with {model_dir} (/reset clears the conversation, /exit or Ctrl-D quits)")
    for line in _input_lines():
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            del conversation[1 if system else 0:]
            continue
        if text:
            typer.echo(f"assistant> {reply(text)}")


STAGES = ("synthesize", "train_sft", "complete", "judge", "binarize", "train_dpo")


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help=f"one of: {', '.join(STAGES)}")],
    recipe: Annotated[Path, typer.Argument(help="recipe YAML")],
    run_dir: Annotated[Path, typer.Option(help="where the run's outputs go")] = Path("runs/latest"),
    address: Annotated[Optional[str], typer.Option(help="Ray address (default: a running cluster, else a local one)")] = None,
) -> None:
    """Run one stage of a recipe; a stage whose output is complete is skipped, a partial one redone."""
    from .config import RecipeError, load_recipe
    from .stages import run_stage

    if name not in STAGES:
        _fail(f"unknown stage '{name}'; choose from {', '.join(STAGES)}")
    try:
        loaded = load_recipe(recipe)
    except RecipeError as err:
        _fail(err.problems)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = run_stage(name, loaded, run_dir, address=address)
    except (ValueError, FileNotFoundError, NotImplementedError) as err:
        _fail(str(err))
    typer.echo(json.dumps(dataclasses.asdict(result), indent=2, default=str))


def _input_lines():
    """Lines typed at a prompt (until Ctrl-D), or piped in on stdin."""
    if not sys.stdin.isatty():
        yield from sys.stdin
        return
    while True:
        try:
            yield input("you> ")
        except EOFError:
            return


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="where the tiny models go")] = Path("artifacts"),
    message: Annotated[str, typer.Option("--message", "-m")] = "How do bees make honey?",
) -> None:
    """Build the tiny models and chat with the teacher through a real vLLM engine on this machine."""
    tiny_models(workdir / "tiny-models")
    typer.echo(f"\nuser> {message}")
    chat(str(workdir / "tiny-models" / "teacher"), message=message, system=None, max_tokens=64, temperature=0.0,
         seed=0, max_model_len=512, kv_cache_gib=0.5, verbose=False)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
