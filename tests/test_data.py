import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zephyr_ray import data

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}


def conversation(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


# (raw JSONL line, field, reason fragment); None field = the line as a whole
BAD_LINES = [
    (b"not json at all", None, "not valid JSON"),
    (b"[1, 2]", None, "a row must be a JSON object, got list"),
    ('{"messages": [{"role": "user", "content": "caf\xe9"}]}'.encode("latin-1"), None, "not valid UTF-8"),
    (json.dumps({"messages": "hello"}).encode(), "messages", "valid list"),
    (json.dumps({"messages": conversation(("user", ""), ("assistant", "x"))}).encode(), "messages.0.content",
     "content is empty"),
    (json.dumps({"messages": conversation(("robot", "hi"), ("assistant", "x"))}).encode(), "messages.0.role",
     "'system', 'user' or 'assistant'"),
    (json.dumps({"messages": conversation(("assistant", "x"), ("user", "y"))}).encode(), "messages",
     "messages[0] has role 'assistant', expected 'user'"),
    (json.dumps({"messages": conversation(("user", "q"))}).encode(), "messages",
     "must end with an assistant turn"),
    (json.dumps({"messages": conversation(("user", "x" * 100_001), ("assistant", "y"))}).encode(),
     "messages.0.content", "over the limit of 100000"),
    (json.dumps({"messages": conversation(("user", "\ud800"), ("assistant", "y"))}).encode(), "messages.0.content",
     "lone surrogate"),
    (json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}).encode(),
     "messages.0.content", "missing field"),
    (json.dumps({"prompt": 7, "messages": GOOD["messages"]}).encode(), "prompt", "valid string"),
    (json.dumps({"prompt": "p"}).encode(), "messages", "missing field"),
]


@pytest.fixture()
def jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "dialogues.jsonl"
    lines = [json.dumps(GOOD).encode(), b""] + [line for line, _, _ in BAD_LINES] + [
        json.dumps({"prompt": "Hi", "prompt_id": "abc", **GOOD}).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_jsonl_rows_are_accepted_or_rejected_with_file_row_field_reason(ray_local, jsonl):
    result = data.load(str(jsonl), "dialogue")
    assert (result.report.total, result.report.accepted, result.report.rejected) == (2 + len(BAD_LINES), 2,
                                                                                       len(BAD_LINES))
    accepted = sorted(result.accepted.take_all(), key=lambda r: r["prompt_id"])
    assert accepted[0]["prompt_id"] == data.prompt_id_of("Hi") and accepted[0]["prompt"] == "Hi"
    assert accepted[1]["prompt_id"] == "abc"
    rejects = {r["row"]: r for r in result.rejected.take_all()}
    for offset, (_, field, reason) in enumerate(BAD_LINES):
        reject = rejects[3 + offset]  # line 1 is good, line 2 blank
        assert reject["source"] == str(jsonl)
        assert reject["field"] == field, reject
        assert reason in reject["reason"], reject
        assert reject["raw"]  # the offending row is kept (truncated), even when it is not UTF-8
    assert sum(result.report.reasons.values()) == result.report.rejected


def test_writes_accepted_and_rejects_atomically_and_counts_add_up(ray_local, jsonl, tmp_path):
    result = data.load(str(jsonl), data.DialogueRow)
    report = data.write_validated(result, tmp_path / "out", tmp_path / "rejects", data.DialogueRow)
    assert data.is_complete(tmp_path / "out") and data.is_complete(tmp_path / "rejects")
    accepted = pq.read_table(tmp_path / "out")
    rejected = pq.read_table(tmp_path / "rejects")
    assert accepted.num_rows + rejected.num_rows == report.total == 2 + len(BAD_LINES)
    assert accepted.schema.equals(data.DialogueRow.arrow_schema())
    assert json.loads((tmp_path / "out" / data.SUCCESS_MARKER).read_text()) == {"rows": 2}

    import datasets

    loaded = datasets.load_dataset("parquet", data_files=str(tmp_path / "out" / "*.parquet"), split="train")
    assert set(loaded.column_names) == {"prompt", "prompt_id", "messages"}
    assert loaded[0]["messages"][1] == {"role": "assistant", "content": "Hello!"}


def test_rows_held_in_memory_reach_an_engine_in_blocks_of_one_batch(ray_local):
    """Not a block (so a preprocessing task) per row, as Ray's ``from_items`` makes them, nor its even split (two
    blocks of 15 for a batch of 16 would reach one engine of a pool together): whole batches, then the rest; every
    row once."""
    from zephyr_ray.generate import rows_dataset

    rows = [{"key": str(i), "messages": [{"role": "user", "content": "x" * i}]} for i in range(30)]
    for batch_size, sizes in ((16, [16, 14]), (10, [10, 10, 10]), (30, [30]), (64, [30]), (7, [7, 7, 7, 7, 2])):
        ds = rows_dataset(rows, batch_size)
        blocks = [len(block["key"]) for block in ds.iter_batches(batch_size=None)]
        assert sorted(blocks, reverse=True) == sizes, (batch_size, blocks)
        assert sorted(ds.take_all(), key=lambda r: int(r["key"])) == rows
    assert rows_dataset([], 16).count() == 0


def test_a_crashed_write_leaves_no_output(ray_local, tmp_path):
    import ray.data

    def explode(row):
        if row["id"] == 37:
            raise RuntimeError("worker died")
        return row

    out = tmp_path / "stage-output"
    with pytest.raises(Exception, match="worker died"):
        data.write_parquet_atomic(ray.data.range(100).map(explode), out)
    assert not out.exists() and not data.is_complete(out)
    assert data.write_parquet_atomic(ray.data.range(100), out) == 100
    assert data.is_complete(out)
    assert not list(tmp_path.glob(".stage-output.tmp-*")), "the next run clears what a crash left behind"


def test_empty_output_is_still_a_readable_table(ray_local, tmp_path):
    import ray.data

    empty = ray.data.from_items([{"prompt": "x", "prompt_id": "y"}]).filter(lambda r: False)
    assert data.write_parquet_atomic(empty, tmp_path / "e", schema=data.PromptRow.arrow_schema()) == 0
    table = pq.read_table(tmp_path / "e")
    assert table.num_rows == 0 and table.schema.names == ["prompt", "prompt_id"]


def test_parquet_reader_rejects_by_row_and_keeps_types(ray_local, tmp_path):
    folder = tmp_path / "prefs"
    folder.mkdir()
    chosen = conversation(("user", "Q?"), ("assistant", "good"))
    rejected = conversation(("user", "Q?"), ("assistant", "bad"))
    rows = [
        {"prompt": "Q?", "chosen": chosen, "rejected": rejected, "score_chosen": 8.0, "score_rejected": 3.0},
        {"prompt": "Q?", "chosen": chosen, "rejected": conversation(("user", "other"), ("assistant", "bad")),
         "score_chosen": 8.0, "score_rejected": 3.0},
        {"prompt": "Q?", "chosen": chosen, "rejected": rejected, "score_chosen": float("nan"), "score_rejected": 1.0},
    ]
    pq.write_table(pa.Table.from_pylist(rows[:2]), folder / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[2:]), folder / "part-1.parquet")
    result = data.load(str(folder), "preference")
    (good,) = result.accepted.take_all()
    assert good["prompt_id"] == data.prompt_id_of("Q?") and good["messages"] == chosen
    rejects = sorted(result.rejected.take_all(), key=lambda r: r["source"])
    assert [(Path(r["source"]).name, r["row"]) for r in rejects] == [("part-0.parquet", 2), ("part-1.parquet", 1)]
    assert "share the same prompt turns" in rejects[0]["reason"]
    assert "score_chosen is not a finite number" in rejects[1]["reason"]


def test_hub_layout_is_read_through_datasets_with_its_split(ray_local, tmp_path):
    """A local copy in the hub's layout goes through ``datasets.load_dataset``, exactly as a hub id does."""
    repo = tmp_path / "ultrachat_copy"
    (repo / "data").mkdir(parents=True)
    train = [{"prompt": f"q{i}", "prompt_id": f"id{i}", **GOOD} for i in range(5)]
    test = [{"prompt": "t", "prompt_id": "t", "messages": conversation(("user", "t"), ("assistant", " "))}]
    pq.write_table(pa.Table.from_pylist(train), repo / "data" / "train_sft-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(test), repo / "data" / "test_sft-00000-of-00001.parquet")
    result = data.load(str(repo), "dialogue", split="train_sft")
    assert (result.report.total, result.report.accepted) == (5, 5)
    result = data.load(str(repo), "dialogue", split="test_sft")
    (reject,) = result.rejected.take_all()
    assert (reject["source"], reject["row"], reject["field"]) == (f"{repo}:test_sft", 1, "messages.1.content")
    limited = data.load(str(repo), "dialogue", split="train_sft", limit=2)
    assert limited.report.total == 2


def test_reader_errors_name_the_path(ray_local, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such.jsonl: no such file"):
        data.read_raw(str(tmp_path / "no_such.jsonl"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="no .jsonl, .json or .parquet files"):
        data.read_raw(str(tmp_path / "empty_dir"))


@pytest.mark.parametrize("path, hub", [("HuggingFaceH4/ultrachat_200k", True), ("./data/x", False),
                                       ("data/prompts.jsonl", False), ("/abs/path", False), ("one", False)])
def test_hub_ids_are_told_from_local_paths(path, hub):
    assert data.is_hub_id(path) is hub


@pytest.mark.parametrize("small_cluster", [True, False], ids=["small-cluster-shuffle", "ray-default-shuffle"])
def test_duplicate_prompts_are_rejected_after_the_first(ray_local, tmp_path, small_cluster):
    """The same rejects with the shuffle a small cluster gets (``configure_ray_data``) and with Ray's default."""
    from ray.data import DataContext

    path = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "a"}, {"prompt": ""}, {"prompt": ""},
             {"prompt": "c", "prompt_id": "x"}, {"prompt": "d", "prompt_id": "x"}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    context = DataContext.get_current()
    before = (context.shuffle_strategy, context.default_hash_shuffle_parallelism, context.use_datasource_v2)
    data.configure_ray_data(small_cluster=small_cluster)
    try:
        result = data.load(str(path), "prompt")
        accepted, rejected = result.accepted.take_all(), result.rejected.take_all()
    finally:
        context.shuffle_strategy, context.default_hash_shuffle_parallelism, context.use_datasource_v2 = before
    assert (result.report.total, result.report.accepted, result.report.rejected) == (7, 3, 4)
    assert sorted(r["prompt"] for r in accepted) == ["a", "b", "c"]
    rejects = {r["row"]: r for r in rejected}
    assert rejects[3]["reason"] == f"duplicate prompt_id (first at {path} row 1)" and rejects[3]["field"] == "prompt_id"
    assert rejects[7]["reason"] == f"duplicate prompt_id (first at {path} row 6)"
    assert rejects[4]["reason"] == rejects[5]["reason"] == "prompt is empty"


def test_text_that_is_not_utf8_is_repaired_counted_and_written(ray_local, tmp_path):
    """Lone surrogates (which a Python string holds and UTF-8 cannot) in a plain string column and in nested
    ``messages`` content: every writer repairs them to U+FFFD before Parquet, counts the rows in the output's marker
    and the stage's counts, and leaves valid text (NUL included) as it was; never a crashed write."""
    import ray.data

    from zephyr_ray.stage import text_repaired

    rows = [{"prompt": f"prompt {i}", "prompt_id": f"id{i}", "messages": conversation(("user", f"q{i}"),
                                                                                          ("assistant", f"a{i}"))}
            for i in range(6)]
    rows[1]["prompt"] = "lone \ud800 surrogate"
    rows[2]["messages"][1]["content"] = "nested \udfff and a pair \ud83d\ude00"
    rows[3]["prompt"] = "NUL \x00 is valid UTF-8"
    rows[4]["prompt"] = rows[4]["messages"][0]["content"] = "\udc80 both"
    schema = data.DialogueRow.arrow_schema()
    outputs = {
        "dataset, contract schema": lambda out: data.write_parquet_atomic(
            ray.data.from_items(rows).map(lambda row: row), out, schema=schema),
        "dataset, no schema": lambda out: data.write_parquet_atomic(ray.data.from_items(rows), out),
        "rows on the driver": lambda out: data.write_rows_atomic(rows, out, schema=schema),
    }
    for name, write in outputs.items():
        out = tmp_path / "stage" / name.replace(" ", "-").replace(",", "")
        assert write(out) == len(rows), name
        written = {r["prompt_id"]: r for r in pq.read_table(out).to_pylist()}
        assert written["id1"]["prompt"] == "lone \ufffd surrogate"
        assert written["id2"]["messages"][1]["content"] == "nested \ufffd and a pair \U0001F600"
        assert written["id3"]["prompt"] == "NUL \x00 is valid UTF-8"
        assert written["id4"]["prompt"] == written["id4"]["messages"][0]["content"] == "\ufffd both"
        for i in (0, 5):
            assert written[f"id{i}"] == rows[i]
        repairs = data.text_repairs(out)
        assert repairs == {"rows": 3, "characters": 6, "columns": ["messages", "prompt"]}, (name, repairs)
        assert not list(out.parent.glob(".*tmp-*")), "the repair notes are cleared with the temporary directory"
    # the repaired rows pass the contract when read back (the NUL, valid UTF-8, is the contract's to refuse)
    report = data.load(str(out), data.DialogueRow).report
    assert (report.accepted, dict(report.reasons)) == (len(rows) - 1, {"prompt contains a NUL character": 1})
    assert text_repaired(tmp_path / "stage", tmp_path) == {f"stage/{d.name}": 3 for d in (tmp_path / "stage").iterdir()}
    assert data.text_repairs(tmp_path / "nowhere") is None
    clean = tmp_path / "clean"
    data.write_parquet_atomic(ray.data.from_items(rows[:1] + rows[5:]), clean, schema=schema)
    assert json.loads((clean / data.SUCCESS_MARKER).read_text()) == {"rows": 2} and data.text_repairs(clean) is None
