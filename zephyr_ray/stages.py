"""The stages by name, and the Ray connection they run on."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from .config import Hardware, Recipe
from .engines import cpu_work_selector, prepare_process_env
from .stage import StageResult

log = logging.getLogger(__name__)


def stage_functions() -> dict[str, Callable[[Recipe, Path], StageResult]]:
    from .evaluate import run_evaluate
    from .feedback.binarize import run_binarize
    from .feedback.complete import run_complete
    from .feedback.judge import run_judge
    from .rounds import run_rounds
    from .synthesize import run_synthesize
    from .train.dpo import run_train_dpo
    from .train.sft import run_train_sft

    return {"synthesize": run_synthesize, "train_sft": run_train_sft, "complete": run_complete, "judge": run_judge,
            "binarize": run_binarize, "train_dpo": run_train_dpo, "evaluate": run_evaluate, "rounds": run_rounds}


def _answers(address: str, timeout_s: float = 3.0) -> bool:
    """Whether anything listens at a Ray address (host:port), checked in seconds where Ray's own wait takes minutes."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def starts_a_ray_of_its_own(address: str | None = None) -> bool:
    """Whether ``init_ray(address=...)`` in a process without Ray would start a local Ray rather than join a
    cluster: asked before it runs, by a command that can refuse its input without starting one."""
    from ray._private.services import canonicalize_bootstrap_address

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        return address == "local"
    running = canonicalize_bootstrap_address(None)
    return not (running and _answers(running))


def init_ray(hardware: Hardware, address: str | None = None, workers_here: bool = True) -> bool:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``, or the one `ray start` left running, as ``ray.init()``
    finds it), with ``workers_here`` its workers starting in this directory where their node has it
    (``worker_directory``); else start a local Ray sized for the recipe: more logical CPUs than cores on a CPU
    machine, since engines and light stages share them (a size Ray refuses for a cluster it joins). Returns whether
    this process joined a cluster that others may use (False: it started its own, or Ray was already up here)."""
    import ray
    from ray._private.services import canonicalize_bootstrap_address

    from .data import configure_ray_data
    from .worker_directory import workers_in_this_directory

    joined = False
    if not ray.is_initialized():
        prepare_process_env(hardware)
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            joined = address != "local"
            ray.init(address=address, runtime_env=workers_in_this_directory() if joined and workers_here else None)
        elif (running := canonicalize_bootstrap_address(None)) and _answers(running):  # ray.init()'s own choice
            log.info("joining the Ray cluster that `ray start` left running at %s (--address or RAY_ADDRESS picks "
                     "another; `ray stop` ends it)", running)
            ray.init(runtime_env=workers_in_this_directory() if workers_here else None)
            joined = True
        else:
            if running:  # ray.init() would wait on it for minutes
                log.warning("the Ray cluster that `ray start` recorded at %s does not answer (stopped without `ray "
                            "stop`, which clears the record?): starting a local Ray instead", running)
            size = {"num_cpus": max(4, os.cpu_count() or 1)} if hardware.accelerator == "cpu" else {}
            ray.init(address="local", **size)
    selector = cpu_work_selector(hardware)
    group = [node for node in ray.nodes() if node["Alive"] and selector
             and selector.items() <= (node.get("Labels") or {}).items()]
    if selector and not group:
        log.warning("no node of the CPU worker group %r is up: work that needs no accelerator waits until one "
                    "joins (an autoscaler starts one)", hardware.cpu_node_group)
    configure_ray_data(small_cluster=hardware.accelerator == "cpu", cpu_work_selector=selector,
                       cpu_work_cpus=sum(node["Resources"].get("CPU", 0) for node in group))
    return joined


def run_stage(name: str, recipe: Recipe, run_dir: Path, address: str | None = None) -> StageResult:
    """Run one stage; engine settings its models cannot take are an error before Ray or any engine starts."""
    from .engines import engine_problems

    if problems := engine_problems(getattr(recipe, name, None), name, recipe.hardware):
        raise ValueError("; ".join(problems))
    init_ray(recipe.hardware, address)
    run_dir = run_dir.resolve()  # workers (Ray Train, Ray Data) run in other directories: hand them absolute paths
    run_dir.mkdir(parents=True, exist_ok=True)
    return stage_functions()[name](recipe, run_dir)
