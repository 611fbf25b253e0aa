"""Tiny Mistral-architecture models and their tokenizer: the test and demo stand-ins for Mistral-7B and friends.

Everything is built here from text the package ships (``resources/tiny_corpus.jsonl``), with fixed seeds, so a
machine with no hub access gets the same set of models every time. Sizes follow one rule that vLLM's CPU attention
imposes: head_dim 64 (it refuses 16).

The roles mirror the Zephyr recipe: a *student* that is only a "base" model (plain text, no chat), a *teacher* and a
*judge* that learned the chat format, a pool of *generators* of different sizes and amounts of training, so the
model pool really produces completions of different quality, and a *reward* model (sequence classifier) that
prefers whole, ordered replies over shuffled or cut-off ones.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .chat import BOS_TOKEN, ZEPHYR_CHAT_TEMPLATE

logger = logging.getLogger(__name__)

HEAD_DIM = 64
MAX_POSITIONS = 2048


@dataclass(frozen=True)
class TinySpec:
    """One tiny model: its size, its seed, and how many steps of warm-up training it gets (0 = random weights)."""

    name: str
    role: str
    hidden_size: int
    num_layers: int
    num_kv_heads: int
    seed: int
    train_steps: int
    # "chat": template-rendered dialogues; "text": plain text, like a base model; "preference": a one-logit
    # sequence classifier (a reward model) trained to rank each corpus reply above a spoiled copy of it
    train_on: str
    # the template the model ships: "zephyr"; "none" (like Vicuna- or WizardLM-style pool models, which ship no
    # template: the recipe names one); "no-system" (Zephyr's, refusing a system message as older Mistral-Instruct
    # templates do)
    chat_template: str = "zephyr"
    # whether its tokenizer puts <s> first when it encodes text with special tokens, as Mistral's and Llama's do
    # (the warm-up encodes without it, as for every tiny model: the variant tests the token path, not pretraining)
    adds_bos: bool = False

    @property
    def num_heads(self) -> int:
        return self.hidden_size // HEAD_DIM


TINY_MODELS: tuple[TinySpec, ...] = (
    TinySpec("teacher", "teacher", 192, 2, 1, seed=1, train_steps=100, train_on="chat"),
    TinySpec("judge", "judge", 128, 2, 1, seed=2, train_steps=60, train_on="chat"),
    TinySpec("student", "student", 128, 2, 1, seed=3, train_steps=30, train_on="text", adds_bos=True),
    TinySpec("reward", "reward", 128, 2, 1, seed=4, train_steps=60, train_on="preference"),
    TinySpec("generator-0", "generator", 192, 2, 1, seed=10, train_steps=50, train_on="chat"),
    TinySpec("generator-1", "generator", 128, 2, 1, seed=11, train_steps=50, train_on="chat",
             chat_template="no-system"),
    TinySpec("generator-2", "generator", 128, 1, 1, seed=12, train_steps=20, train_on="chat", chat_template="none"),
    TinySpec("generator-3", "generator", 128, 1, 1, seed=13, train_steps=0, train_on="chat"),
)


def load_corpus() -> list[dict[str, Any]]:
    """The dialogues the package ships: the tokenizer's training text, the tiny models' warm-up data, demo prompts."""
    text = resources.files("zephyr_ray.resources").joinpath("tiny_corpus.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def build_tokenizer(vocab_size: int = 1024) -> Any:
    """Train a byte-level BPE on the shipped corpus and wrap it with the Zephyr chat template, ``</s>`` as EOS and pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .chat import EOS_TOKEN, ROLE_TOKENS, UNK_TOKEN, render_reference

    corpus = load_corpus()
    texts = [render_reference(row["messages"]) for row in corpus]
    texts += [m["content"] for row in corpus for m in row["messages"]]

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[UNK_TOKEN, BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=MAX_POSITIONS,
        chat_template=ZEPHYR_CHAT_TEMPLATE,
        padding_side="right",
    )
    # The role markers are ordinary text in Mistral's tokenizer; one token each keeps tiny contexts short.
    tokenizer.add_tokens(list(ROLE_TOKENS))
    return tokenizer


def bos_adding(tokenizer: Any) -> Any:
    """A copy of the tiny tokenizer that puts ``<s>`` before what it encodes with special tokens, like Mistral's:
    the case where a template that writes its own BOS, or a second encoding, would double it."""
    import copy

    from tokenizers import processors

    variant = copy.deepcopy(tokenizer)
    variant.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, tokenizer.bos_token_id)])
    return variant


def _model_config(spec: TinySpec, tokenizer: Any) -> Any:
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.hidden_size * 2,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        sliding_window=None,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )


def _training_batch(spec: TinySpec, tokenizer: Any) -> tuple[Any, Any]:
    """All of the corpus as one padded batch; labels of padding are -100 but every ``</s>`` is a label."""
    import torch

    corpus = load_corpus()
    if spec.train_on == "chat":
        texts = [tokenizer.apply_chat_template(row["messages"], tokenize=False) for row in corpus]
    else:
        texts = [" ".join(m["content"] for m in row["messages"]) for row in corpus]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(encoded), width), -100, dtype=torch.long)
    for i, ids in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(ids)] = torch.tensor(ids)
    return input_ids, labels


def reward_text(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """What a reward model reads: the chat rendered up to the end of the last (assistant) reply, no ``</s>`` after
    it, so its last token is the reply's own. This is how vLLM's chat step renders a chat that ends on the
    assistant, and vLLM classifies on the last token."""
    return tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)


def _preference_batch(tokenizer: Any) -> tuple[Any, Any]:
    """Each corpus dialogue with its reply, and the same dialogue with the reply spoiled (words shuffled, or cut
    to its first few words), as two right-padded batches."""
    import random


    rng = random.Random(0)
    chosen, rejected = [], []
    for i, row in enumerate(load_corpus()):
        turns = [m for m in row["messages"] if m["role"] != "system"]
        words = turns[-1]["content"].split()
        if i % 2:
            spoiled = words[: max(1, len(words) // 4)]
        else:
            spoiled = words[:]
            rng.shuffle(spoiled)
        chosen.append(reward_text(tokenizer, turns))
        rejected.append(reward_text(tokenizer, [*turns[:-1], {"role": "assistant", "content": " ".join(spoiled)}]))
    encoded = tokenizer(chosen + rejected, add_special_tokens=False, padding=True, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def _train_reward(model: Any, spec: TinySpec, tokenizer: Any) -> float:
    """Bradley-Terry loss, -log sigmoid(r_chosen - r_rejected), full batch."""
    import torch

    input_ids, attention_mask = _preference_batch(tokenizer)
    half = input_ids.shape[0] // 2
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    model.train()
    for _ in range(spec.train_steps):
        rewards = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
        loss = -torch.nn.functional.logsigmoid(rewards[:half] - rewards[half:]).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return loss.item()


def build_model(spec: TinySpec, tokenizer: Any) -> Any:
    """A seeded random Mistral, warmed up for ``spec.train_steps`` full-batch AdamW steps on the shipped corpus."""
    import torch
    from transformers import MistralForCausalLM, MistralForSequenceClassification

    torch.manual_seed(spec.seed)
    if spec.train_on == "preference":
        config = _model_config(spec, tokenizer)
        config.num_labels = 1
        model = MistralForSequenceClassification(config)
        loss = _train_reward(model, spec, tokenizer)
        model.eval()
        logger.info("%s: %d reward steps, final loss %.3f", spec.name, spec.train_steps, loss)
        return model
    model = MistralForCausalLM(_model_config(spec, tokenizer))
    if spec.train_steps:
        input_ids, labels = _training_batch(spec, tokenizer)
        attention_mask = (labels != -100).long()
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
        model.train()
        for _ in range(spec.train_steps):
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()
        logger.info("%s: %d warm-up steps, final loss %.3f", spec.name, spec.train_steps, loss.item())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


SHIPPED_TEMPLATES: dict[str, str | None] = {
    "zephyr": ZEPHYR_CHAT_TEMPLATE,
    "none": None,
    "no-system": "{%- if messages and messages[0]['role'] == 'system' -%}"
                 "{{- raise_exception('System role not supported') -}}{%- endif -%}" + ZEPHYR_CHAT_TEMPLATE,
}


def build_tiny_models(out_dir: str | Path, names: list[str] | None = None, overwrite: bool = False) -> dict[str, Path]:
    """Build the tiny models into ``out_dir/<name>`` (safetensors + tokenizer); returns name -> directory.

    A model whose directory is already complete is kept (re-runs are cheap); each is written to a temporary
    directory and renamed into place, so an interrupted build never leaves a half model behind.
    """
    import shutil

    import torch

    from .chat import check_chat_template

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specs = [s for s in TINY_MODELS if names is None or s.name in names]
    unknown = set(names or ()) - {s.name for s in TINY_MODELS}
    if unknown:
        raise ValueError(f"unknown tiny model(s) {sorted(unknown)}; choose from {[s.name for s in TINY_MODELS]}")
    tokenizer = build_tokenizer()
    check_chat_template(tokenizer)
    built: dict[str, Path] = {}
    with torch.random.fork_rng():
        for spec in specs:
            target = out / spec.name
            spec_json = json.dumps(spec.__dict__, indent=2) + "\n"
            if (target / "model.safetensors").exists() and not overwrite and (
                    (target / "tiny_spec.json").is_file() and (target / "tiny_spec.json").read_text() == spec_json):
                built[spec.name] = target
                continue
            started = time.perf_counter()
            tmp = out / f".{spec.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            spec_tokenizer = bos_adding(tokenizer) if spec.adds_bos else tokenizer
            model = build_model(spec, spec_tokenizer)
            model.save_pretrained(tmp, safe_serialization=True)
            spec_tokenizer.chat_template = SHIPPED_TEMPLATES[spec.chat_template]
            spec_tokenizer.save_pretrained(tmp)
            tokenizer.chat_template = ZEPHYR_CHAT_TEMPLATE
            (tmp / "tiny_spec.json").write_text(spec_json)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
            n_params = sum(p.numel() for p in model.parameters())
            logger.info("built %s (%s, %.2fM params) in %.1fs", spec.name, spec.role, n_params / 1e6,
                        time.perf_counter() - started)
            built[spec.name] = target
    return built
