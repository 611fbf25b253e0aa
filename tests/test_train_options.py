"""The SFT options users reach for: assistant-only loss, packing, LoRA and experiment trackers.

The first tests look at what TRL's SFTTrainer builds from our arguments (labels, packed batches) in this process;
the last runs them together through the real train_sft stage: Ray Train, 2 workers, DeepSpeed ZeRO-3.
"""

import json
from pathlib import Path

import pytest
import yaml
from conftest import record_reliability, tiny_recipe_data

from zephyr_ray.config import Hardware, TrainSFTConfig, load_recipe
from zephyr_ray.data import DialogueRow, prompt_id_of, write_parquet_atomic
from zephyr_ray.stages import run_stage
from zephyr_ray.tiny import load_corpus

CPU = Hardware(accelerator="cpu", num_workers=1)


def chats(n: int, offset: int = 0) -> list[list[dict]]:
    return [[m for m in row["messages"] if m["role"] != "system"] for row in load_corpus()[offset:offset + n]]


def sft_trainer(student: Path, tmp_path: Path, rows: list[list[dict]], **options):
    """TRL's SFTTrainer in this process with the arguments train_sft generates (no DeepSpeed: zero_stage 0)."""
    import datasets
    from trl import SFTTrainer

    from zephyr_ray.train.loop import load_tokenizer
    from zephyr_ray.train.sft import sft_config

    training = TrainSFTConfig(**{"learning_rate": 1e-3, "global_batch_size": 2, "max_length": 256, "zero_stage": 0,
                                 **options})
    tokenizer = load_tokenizer(str(student), training)
    args = sft_config(training, CPU, str(tmp_path / "out"), {"use_cpu": True}, tokenizer)
    train = datasets.Dataset.from_list([{"messages": chat} for chat in rows])
    return SFTTrainer(model=str(student), args=args, train_dataset=train, processing_class=tokenizer), tokenizer


def labelled_runs(labels: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of positions that carry a label."""
    runs, start = [], None
    for i, label in enumerate([*labels, -100]):
        if label != -100 and start is None:
            start = i
        elif label == -100 and start is not None:
            runs.append((start, i))
            start = None
    return runs


def test_assistant_only_loss_trains_each_reply_and_its_stop_token_only(tiny_models, tmp_path):
    rows = chats(2)
    trainer, tokenizer = sft_trainer(tiny_models["student"], tmp_path, rows, packing=False, assistant_only_loss=True)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    for i, chat in enumerate(rows):
        ids, labels = batch["input_ids"][i].tolist(), batch["labels"][i].tolist()
        replies = [m["content"] for m in chat if m["role"] == "assistant"]
        runs = labelled_runs(labels)
        # next-token labels: a run covers one reply, ending with its </s> (the collator shifts inside the model)
        assert [tokenizer.decode(ids[a:b]) for a, b in runs] == [reply + "</s>" for reply in replies]
        mask = batch["attention_mask"][i].tolist()
        unlabelled_eos = [p for p, t in enumerate(ids) if t == tokenizer.eos_token_id and mask[p] and labels[p] == -100]
        assert len(unlabelled_eos) == sum(m["role"] == "user" for m in chat), "the user turns' </s> train nothing"


def test_full_loss_keeps_every_stop_token_although_pad_is_eos(tiny_models, tmp_path):
    """Zephyr's tokenizer pads with </s>: the collator must mask padding by position, not by token id."""
    by_length = sorted(chats(32), key=lambda chat: sum(len(m["content"]) for m in chat))
    rows = [by_length[-1], by_length[0]]  # the longest and the shortest dialogue: the short one gets padded
    trainer, tokenizer = sft_trainer(tiny_models["student"], tmp_path, rows, packing=False)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    for i, chat in enumerate(rows):
        ids, labels, mask = (batch[k][i].tolist() for k in ("input_ids", "labels", "attention_mask"))
        real_eos = [p for p, t in enumerate(ids) if t == tokenizer.eos_token_id and mask[p]]
        assert len(real_eos) == len(chat), "one </s> per turn"
        assert all(labels[p] == tokenizer.eos_token_id for p in real_eos)
        assert all(labels[p] == -100 for p, m in enumerate(mask) if not m)
    assert 0 in batch["attention_mask"][1].tolist(), "the short dialogue was padded"


def test_packing_keeps_packed_dialogues_from_attending_to_each_other(tiny_models, tmp_path):
    """Packed rows restart position_ids at each dialogue; with SDPA (no FlashAttention on CPU), transformers turns
    that into a block-diagonal mask, so each dialogue's logits in a pack equal those of the dialogue alone: no
    cross-contamination between packed dialogues."""
    import torch
    from transformers import AutoModelForCausalLM

    rows = chats(6)
    trainer, _ = sft_trainer(tiny_models["student"], tmp_path, rows, packing=True)
    assert trainer.padding_free and len(trainer.train_dataset) < len(rows)
    pack = trainer.data_collator([trainer.train_dataset[0]])
    positions = pack["position_ids"][0].tolist()
    starts = [p for p, pos in enumerate(positions) if pos == 0]
    assert len(starts) >= 2, "the first pack holds several dialogues"
    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"], attn_implementation="sdpa").eval()
    with torch.no_grad():
        # as TRL's SFTTrainer calls it: no cache (with a cache, transformers does not look for packed rows)
        packed = model(input_ids=pack["input_ids"], position_ids=pack["position_ids"], use_cache=False).logits[0]
        for a, b in zip(starts, [*starts[1:], len(positions)], strict=True):
            alone = model(input_ids=pack["input_ids"][:, a:b]).logits[0]
            torch.testing.assert_close(packed[a:b], alone, atol=1e-4, rtol=1e-4)
    assert sum(1 for label in pack["labels"][0].tolist() if label != -100) > 0


def test_packing_keeps_every_token_of_a_dialogue_longer_than_max_length(tiny_models, tmp_path):
    """The recipe's default packing (bfd_split) splits a long dialogue over packed rows; TRL's own default (bfd)
    cut it at max_length and dropped the rest, its last turns and end-of-turn tokens with them."""
    longest = max(chats(64), key=lambda chat: sum(len(m["content"]) for m in chat))
    tokens = {}
    for strategy, max_length in (("whole", 1024), ("bfd_split", 16), ("bfd", 16)):
        options = {"packing": False} if strategy == "whole" else {"packing": True, "packing_strategy": strategy}
        trainer, _ = sft_trainer(tiny_models["student"], tmp_path / strategy, [longest], max_length=max_length,
                                 **options)
        tokens[strategy] = sum(len(row["input_ids"]) for row in trainer.train_dataset)
    assert tokens["whole"] > 16 and tokens["bfd_split"] == tokens["whole"] and tokens["bfd"] == 16, tokens


def test_trl_args_win_over_the_fields_a_stage_sets_itself(tiny_models, tmp_path):
    """`trl_args` may name what train_sft and train_dpo pass themselves (packing, beta, ...): it wins, instead of a
    TypeError for a keyword given twice."""
    from trl import DPOConfig

    from zephyr_ray.config import TrainDPOConfig
    from zephyr_ray.train.dpo import dpo_arguments
    from zephyr_ray.train.loop import trainer_arguments

    trainer, _ = sft_trainer(tiny_models["student"], tmp_path, chats(2), packing=True,
                             trl_args={"packing": False, "eos_token": "</s>"})
    assert trainer.args.packing is False
    dpo = TrainDPOConfig(learning_rate=1e-6, global_batch_size=2, zero_stage=0, beta=0.1, trl_args={"beta": 0.3})
    args = DPOConfig(**trainer_arguments(dpo, CPU, str(tmp_path / "dpo"), {"use_cpu": True}, **dpo_arguments(dpo)))
    assert args.beta == 0.3


def tensorboard_scalars(directory: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[float]] = {}
    for events in directory.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(e.value for e in accumulator.Scalars(tag))
    return scalars


@pytest.mark.engine
@pytest.mark.timeout(1200)
def test_lora_with_packing_and_assistant_only_loss_under_zero3(tiny_models, ray_local, tmp_path):
    """LoRA + packing + assistant-only loss + TensorBoard through train_sft on 2 ZeRO-3 workers: the adapter trains,
    the export is the base with the adapter merged (a plain model) plus the adapter itself, and the loss curve is in
    TensorBoard as well as in Ray Train's result."""
    import ray
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    rows = [{"prompt": chat[0]["content"], "prompt_id": prompt_id_of(chat[0]["content"]), "messages": chat}
            for chat in chats(40, offset=8)]
    write_parquet_atomic(ray.data.from_items(rows), run_dir / "synthesize" / "dialogues",
                         schema=DialogueRow.arrow_schema())
    data = tiny_recipe_data(tiny_models)
    data["train_sft"].update(num_epochs=3, learning_rate=5e-3, packing=True, assistant_only_loss=True,
                             lora={"r": 8, "alpha": 16, "dropout": 0.0}, report_to=["tensorboard"], max_failures=0)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(data))
    result = run_stage("train_sft", load_recipe(tmp_path / "recipe.yaml"), run_dir)

    model = run_dir / "train_sft" / "model"
    assert result.outputs["model"] == str(model)
    adapter = json.loads((model / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 8 and (model / "adapter" / "adapter_model.safetensors").is_file()
    merged, base = load_file(model / "model.safetensors"), load_file(tiny_models["student"] / "model.safetensors")
    assert set(merged) == set(base), "the export is a plain model: no LoRA tensors left in it"
    changed = {name for name in base if not (merged[name] == base[name]).all()}
    assert any("q_proj" in name for name in changed) and any("down_proj" in name for name in changed)
    assert not any("embed_tokens" in name or "norm" in name for name in changed), "LoRA leaves these alone"
    lines = [json.loads(line) for path in (run_dir / "train_sft" / "attempts").glob("rank*.jsonl")
             for line in path.read_text().splitlines()]
    assert len(lines) == 2 and all(0.4 <= line["params_held"] / line["params_total"] <= 0.6 for line in lines)

    scalars = tensorboard_scalars(run_dir / "train_sft" / "tensorboard")
    losses = scalars["train/loss"]
    metrics = json.loads((run_dir / "train_sft" / "metrics.json").read_text())
    assert len(losses) == metrics["step"] and losses[-1] < losses[0], losses
    assert metrics["loss"] == pytest.approx(losses[-1], rel=1e-3)


def test_dpo_pairs_whose_prompt_is_too_long_go_to_the_rejects_and_only_they(tiny_models, tmp_path):
    """train_dpo's split: a pair whose templated prompt is over max_prompt_length tokens is written to the rejects
    with its length, the others to the training data; every pair is in exactly one of them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from zephyr_ray.train.dpo import split_by_prompt_length

    def pair(prompt: str) -> dict:
        user = {"role": "user", "content": prompt}
        return {"prompt": prompt, "prompt_id": prompt_id_of(prompt),
                "chosen": [user, {"role": "assistant", "content": "It is red."}],
                "rejected": [user, {"role": "assistant", "content": "It is blue."}]}

    prompts = ["What colour is the fema?", "Tell me " + "about the fema and the reba, " * 20 + "please.",
               "Which colour does the reba have?", "And the moon?"]
    preferences = tmp_path / "preferences"
    preferences.mkdir()
    pq.write_table(pa.Table.from_pylist([pair(p) for p in prompts]), preferences / "part-0.parquet")
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["student"])
    counts = split_by_prompt_length(preferences, tokenizer, 64, tmp_path / "kept", tmp_path / "rejects")
    assert counts == {"pairs": 4, "kept": 3, "rejected": 1}
    kept = pq.read_table(tmp_path / "kept").to_pylist()
    rejects = pq.read_table(tmp_path / "rejects").to_pylist()
    assert sorted(r["prompt"] for r in kept) == sorted(prompts[:1] + prompts[2:])
    assert [r["prompt"] for r in rejects] == [prompts[1]]
    assert rejects[0]["reason"].endswith("tokens, over max_prompt_length 64") and "reason" not in kept[0]
    assert json.loads((tmp_path / "kept" / "_SUCCESS").read_text())["rows"] == 3


def test_flash_attention_only_where_the_model_trains_in_bf16(monkeypatch):
    """With the flash-attn extra installed (stood in for here: no GPU), a GPU recipe trains with FlashAttention-2 in
    bf16 and with SDPA when the model loads in fp32 (`bf16: false`), where FlashAttention's kernels would fail."""
    import importlib.util

    from zephyr_ray.train.loop import model_init_kwargs

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else found(name, *a))
    gpu = Hardware(accelerator="gpu", num_workers=1)
    for bf16, dtype, kernel in ((True, "bfloat16", "flash_attention_2"), (False, "float32", "sdpa")):
        kwargs = model_init_kwargs(TrainSFTConfig(learning_rate=1e-5, global_batch_size=8, bf16=bf16), gpu)
        assert (kwargs["dtype"], kwargs["attn_implementation"]) == (dtype, kernel)
    on_cpu = model_init_kwargs(TrainSFTConfig(learning_rate=1e-5, global_batch_size=8), CPU)
    assert on_cpu["attn_implementation"] == "sdpa"


def test_a_model_saved_in_shards_is_exported_whole(tiny_models, tmp_path):
    """A model over transformers' shard size (50 GB: a 13B in bf16, say) is saved as model-0000i-of-0000n files with
    an index; the export takes every shard (it took model.safetensors only, and failed with no weights)."""
    import torch
    from ray.train import Checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zephyr_ray.train.loop import export_model

    model = AutoModelForCausalLM.from_pretrained(tiny_models["student"])
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint, max_shard_size="500KB")
    AutoTokenizer.from_pretrained(tiny_models["student"]).save_pretrained(checkpoint)
    shards = sorted(p.name for p in checkpoint.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and (checkpoint / "model.safetensors.index.json").is_file()
    export_model(Checkpoint.from_directory(str(checkpoint)), tmp_path / "model", card="# test\n")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    for (name, ours), (_, theirs) in zip(exported.state_dict().items(), model.state_dict().items(), strict=True):
        torch.testing.assert_close(ours, theirs, msg=name)


def test_a_rank_that_cannot_see_the_run_dir_says_it_needs_shared_storage(tmp_path):
    """On 2 nodes with a run directory on local disk, the second node's ranks do not find the stage's input: the
    error says what is wrong (the run directory is not shared) and what to do, naming the file."""
    from zephyr_ray.train.loop import check_run_dir_is_shared

    present = tmp_path / "part-0.parquet"
    present.write_bytes(b"")
    check_run_dir_is_shared([str(present)])
    with pytest.raises(FileNotFoundError, match=r"not found on .*: this stage's run directory must be on storage "
                                                r"every node mounts") as caught:
        check_run_dir_is_shared([str(present), str(tmp_path / "elsewhere.parquet")])
    assert str(tmp_path / "elsewhere.parquet") in str(caught.value)


@pytest.mark.reliability("hostile input", "a training job resubmitted with another zero_stage than its checkpoints', "
                                          "from any stage to any stage")
def test_every_zero_stage_change_resumes_or_is_refused_before_a_worker_starts(tmp_path):
    """Checkpoints as DeepSpeed writes them under each stage (its model-states file, with the saving ranks and
    config, named as that stage names it; none without DeepSpeed), read as a resubmitted job reads them: ZeRO-1 and
    ZeRO-2 load each other's as universal checkpoints, as does another world size; between ZeRO-3, ZeRO-1/2 and no
    DeepSpeed the job is refused with the checkpoint, its stage and both ways on, once by the driver before any
    worker starts (not once per Ray Train retry). The fixture's real ZeRO-3 checkpoints: test_train.py."""
    import torch

    from zephyr_ray.train.loop import refuse_unloadable_checkpoints, saved_deepspeed_layout, universal_needed

    def experiment(saved_stage: int) -> Path:
        folder = tmp_path / f"stage{saved_stage}" / "ray" / "train_sft"
        for step in (10, 20):  # the newest is read: a ranks' count changed between them
            checkpoint = folder / "hf" / f"checkpoint-{step}"
            checkpoint.mkdir(parents=True)
            if saved_stage:
                (checkpoint / "latest").write_text(f"global_step{step}")
                name = ("zero_pp_rank_0_mp_rank_00_model_states.pt" if saved_stage == 3
                        else "mp_rank_00_model_states.pt")
                (checkpoint / f"global_step{step}").mkdir()
                torch.save({"dp_world_size": step // 10, "ds_config": {"zero_optimization": {"stage": saved_stage}}},
                           checkpoint / f"global_step{step}" / name)
        return folder

    families = {0: "no DeepSpeed", 1: "ZeRO-1/2", 2: "ZeRO-1/2", 3: "ZeRO-3"}
    for saved_stage in (0, 1, 2, 3):
        folder = experiment(saved_stage)
        newest = folder / "hf" / "checkpoint-20"
        assert saved_deepspeed_layout(newest) == ((2, saved_stage) if saved_stage else None)
        for zero_stage in (0, 1, 2, 3):
            if families[saved_stage] == families[zero_stage]:
                refuse_unloadable_checkpoints(folder, zero_stage)
                assert [universal_needed(newest, world, zero_stage) for world in (2, 1)] == (
                    [saved_stage != zero_stage, True] if saved_stage else [False, False])
                continue
            held = f"ZeRO stage {saved_stage}'s state" if saved_stage else "no DeepSpeed state (zero_stage 0)"
            back = {0: "0", 1: "1 (or 2)", 2: "2 (or 1)", 3: "3"}[saved_stage]
            expected = (f"{newest}: this checkpoint holds {held} and the recipe now says zero_stage {zero_stage}; "
                        f"{families[saved_stage]} and {families[zero_stage]} cannot load each other's optimizer "
                        f"state: set zero_stage back to {back}, or remove the stage's checkpoints ({folder}) to "
                        "train from the start")
            with pytest.raises(ValueError) as refused:
                universal_needed(newest, 2, zero_stage)
            assert str(refused.value) == expected
            if saved_stage:  # the driver sees DeepSpeed's checkpoints; one without is refused by the workers
                with pytest.raises(ValueError) as refused:
                    refuse_unloadable_checkpoints(folder, zero_stage)
                assert str(refused.value) == expected
            else:
                refuse_unloadable_checkpoints(folder, zero_stage)
    refuse_unloadable_checkpoints(tmp_path / "never-trained", 3)  # a first run has no checkpoints
    record_reliability("hostile input", "a training job resubmitted with another zero_stage than its checkpoints', "
                                        "from any stage to any stage",
                       "ZeRO-1 <-> ZeRO-2: loaded as universal checkpoints, as another world size is; the other 10 "
                       "changes among 0, 1/2 and 3 refused with the checkpoint's path, its stage and both ways on, "
                       "by the driver before any worker starts (from zero_stage 0: by the workers)",
                       "nothing: the checkpoints are untouched, no step trains without its optimizer state")


def test_training_workers_get_absolute_model_paths_and_hub_ids_as_written(tiny_models, tmp_path, monkeypatch):
    """Ray Train runs its workers in a directory of its own (its `chdir` to the run's working directory), so a
    recipe's relative model and reference paths, which the driver checked in its own directory, reach them absolute;
    a hub id, which names nothing here, is passed as written."""
    from zephyr_ray.train.loop import loop_config

    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(tiny_recipe_data(tiny_models)))
    recipe = load_recipe(tmp_path / "recipe.yaml")
    monkeypatch.chdir(tiny_models["student"].parent)
    config = loop_config("train_dpo", recipe, "./student", [], tmp_path, reference="teacher")
    assert (config["model"], config["reference"]) == (str(tiny_models["student"].resolve()),
                                                      str(tiny_models["teacher"].resolve()))
    config = loop_config("train_sft", recipe, "mistralai/Mistral-7B-v0.1", [], tmp_path)
    assert (config["model"], config["reference"]) == ("mistralai/Mistral-7B-v0.1", None)
