"""Scale-out decisions: how many engine replicas a stage asks Ray Data for, and which pool models run side by side.

Unit tests of the rules (no engine); the side-by-side write runs on the test session's real Ray.
"""

import pyarrow.parquet as pq
import pytest

from zephyr_ray.config import Engine, Hardware, RecipeError, load_recipe
from zephyr_ray.engines import (
    CPU_ENGINE_CPUS,
    engine_replicas,
    gpus_per_engine,
    placement_bundles,
    side_by_side,
)

GPU = Hardware(accelerator="gpu", num_workers=16)
CPU = Hardware(accelerator="cpu", num_workers=2)


def engine(**fields) -> Engine:
    return Engine(model="mistralai/Mistral-7B-v0.1", **fields)


def test_auto_replicas_fill_the_clusters_gpus_and_explicit_values_stay():
    cluster = (96.0, 16.0)
    assert engine().concurrency == "auto"
    assert engine_replicas(engine(), GPU, cluster) == 16
    assert engine_replicas(engine(tensor_parallel_size=2), GPU, cluster) == 8
    assert engine_replicas(engine(tensor_parallel_size=2, engine_kwargs={"pipeline_parallel_size": 2}), GPU,
                           cluster) == 4
    # four pool models side by side share the 16 GPUs
    assert engine_replicas(engine(), GPU, cluster, sharing=4) == 4
    # an engine larger than its share still gets one replica
    assert engine_replicas(engine(tensor_parallel_size=8), GPU, cluster, sharing=4) == 1
    assert engine_replicas(engine(concurrency=3), GPU, cluster) == 3
    assert engine_replicas(engine(concurrency=[2, 6]), GPU, cluster) == (2, 6)
    assert engine_replicas(engine(), CPU, (4.0, 0.0)) == 1


def test_an_autoscaling_cluster_with_no_gpu_up_yet_counts_the_recipes_workers():
    from zephyr_ray.engines import cluster_capacity

    cpus, gpus = cluster_capacity(GPU)  # no Ray in this process: nothing running counts
    assert gpus == 16 and cpus >= 1
    assert cluster_capacity(CPU)[1] == 0


def test_pool_models_run_side_by_side_while_they_fit():
    four = [engine() for _ in range(4)]
    assert side_by_side(four, GPU, (96.0, 16.0)) == [[0, 1, 2, 3]]
    assert side_by_side(four, GPU, (96.0, 2.0)) == [[0, 1], [2, 3]]
    big = [engine(tensor_parallel_size=8), engine(tensor_parallel_size=8), engine(tensor_parallel_size=4)]
    assert side_by_side(big, GPU, (96.0, 16.0)) == [[0, 1], [2]]
    assert side_by_side([engine(concurrency=12), engine(concurrency=[8, 16])], GPU, (96.0, 16.0)) == [[0], [1]]
    # CPU: engines while a CPU stays free for the tasks that feed them (4 logical CPUs: two engines at a time)
    assert side_by_side(four, CPU, (4.0, 0.0)) == [[0, 1], [2, 3]]
    assert side_by_side(four, CPU, (2.0, 0.0)) == [[0], [1], [2], [3]]
    assert side_by_side(four, CPU, (1.0 + 4 * CPU_ENGINE_CPUS, 0.0)) == [[0, 1, 2, 3]]
    assert side_by_side([], GPU, (96.0, 16.0)) == []


def test_an_engine_takes_one_gpu_bundle_per_rank():
    assert gpus_per_engine(engine(tensor_parallel_size=4, engine_kwargs={"pipeline_parallel_size": 2})) == 8
    assert placement_bundles(engine(tensor_parallel_size=2), GPU) == [{"GPU": 1, "CPU": 1}] * 2
    assert placement_bundles(engine(tensor_parallel_size=2), CPU) == [{"CPU": 1}]


@pytest.mark.parametrize(("value", "problem"), [
    ("0", "concurrency must be at least 1"),
    ("[4, 2]", "needs 1 <= min <= max"),
    ("many", "concurrency"),
])
def test_a_bad_concurrency_names_the_key(tmp_path, value, problem):
    path = tmp_path / "recipe.yaml"
    path.write_text("name: x\nhardware: {accelerator: gpu}\njudge:\n  engine:\n    model: some/judge\n"
                    f"    concurrency: {value}\n")
    with pytest.raises(RecipeError) as raised:
        load_recipe(path)
    assert "judge.engine.concurrency" in str(raised.value) and problem in str(raised.value)


def test_the_7b_recipe_leaves_replicas_to_the_cluster():
    from conftest import REPO

    recipe = load_recipe(REPO / "jobs" / "configs" / "zephyr-7b.yaml")
    engines = [recipe.evaluate.model, recipe.evaluate.pairwise.baseline] + [m.engine for m in recipe.complete.models]
    assert all(e.concurrency == "auto" for e in engines)
    assert side_by_side([m.engine for m in recipe.complete.models], recipe.hardware, (96.0, 16.0)) == [[0, 1, 2, 3]]


def test_outputs_written_side_by_side_are_each_whole_and_published_alone(ray_local, tmp_path):
    """One Ray Data execution, three outputs: each gets exactly its rows, its marker, and an empty one a file."""
    import pyarrow as pa
    import ray.data

    from zephyr_ray.data import SUCCESS_MARKER, write_parquet_atomic_many, written_rows

    schema = pa.schema([("model", pa.string()), ("i", pa.int64())])
    parts = [(ray.data.from_items([{"model": name, "i": i} for i in range(n)]), tmp_path / name)
             for name, n in (("a", 5), ("b", 0), ("c", 3))]
    parts[1] = (ray.data.from_items([{"model": "b", "i": 0}]).limit(0), tmp_path / "b")
    assert write_parquet_atomic_many(parts, schema=schema) == [5, 0, 3]
    for name, n in (("a", 5), ("b", 0), ("c", 3)):
        table = pq.read_table(tmp_path / name)
        assert table.schema.names == ["model", "i"] and table.num_rows == n == written_rows(tmp_path / name)
        assert set(table.column("model").to_pylist()) <= {name}
        assert (tmp_path / name / SUCCESS_MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"], "no temporary directory left"


def test_a_number_of_replicas_is_a_fixed_pool_for_ray_data():
    from zephyr_ray.engines import actor_pool_size

    assert actor_pool_size(4) == (4, 4)  # ray.data.llm alone would read 4 as "1 to 4"
    assert actor_pool_size((1, 4)) == (1, 4)
