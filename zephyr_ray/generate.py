"""Chat generation (and classification) over a Ray dataset with a ``ray.data.llm`` vLLM processor: the one path
every stage uses.

Rows go in with ``messages`` (a chat) and ``sampling_params`` (a dict vLLM understands, per row) and come out with
every input column kept, plus ``generated_text``, token counts, ``finish_reason`` and ``generation_error``.
``classify`` runs a sequence classifier (a reward model) on chats instead and adds ``classifier_logits``.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from .chat import prompt_token_ids, template_for, tokenizer_of
from .config import Engine, Hardware
from .engines import context_length, keep_engines_off_cpu_nodes, vllm_processor_config

logger = logging.getLogger(__name__)

# Columns the processor writes itself; ours of the same name are parked under a prefix while it runs.
_PROCESSOR_COLUMNS = ("prompt", "prompt_token_ids", "params", "request_id", "batch_uuid", "metrics", "logprobs",
                      "prompt_logprobs", "embeddings", "generated_tokens", "generated_text", "num_input_tokens",
                      "num_generated_tokens", "time_taken_llm")
_PARKED = "__zr_"
_DROP = ("prompt_token_ids", "tokenized_prompt", "params", "request_id", "batch_uuid", "metrics", "prompt_logprobs",
         "embeddings", "generated_tokens", "time_taken_llm", "__inference_error__", "logprobs", "prompt")


def _park(row: dict[str, Any], model: str, template: str | None, trust_remote_code: bool = False) -> dict[str, Any]:
    """Park our columns that share a name with the processor's, and give the engine the prompt's token ids, made as
    every path makes them (``chat.prompt_token_ids``). Ray's chat-template and tokenize stages are not used: its
    tokenize stage, and vLLM's text path, add special tokens (a second BOS after a template's own), and its engine
    stage passes ``tokenization_kwargs`` to pooling requests only."""
    parked = {(_PARKED + k if k in _PROCESSOR_COLUMNS else k): v for k, v in row.items()}
    messages = row["messages"].tolist() if hasattr(row["messages"], "tolist") else row["messages"]
    try:
        parked["tokenized_prompt"] = prompt_token_ids(tokenizer_of(model, trust_remote_code), messages, template)
    except Exception as err:  # jinja2's errors, raise_exception in a template: say whose template and which row
        roles = [m.get("role") for m in messages]
        raise ValueError(f"{model}: its chat template cannot render a conversation with roles {roles} "
                         f"(prompt_id {row.get('prompt_id')}): {err}") from err
    for params in ("sampling_params", "pooling_params"):  # the processor consumes its copy
        if params in row:
            parked[_PARKED + params] = row[params]
    return parked


def finish_reason(prompt_tokens: int, generated_tokens: int, max_tokens: int, max_model_len: int | None,
                  error: str | None) -> str:
    """vLLM stops at a stop token (``stop``), or at ``max_tokens`` or the end of the context (``length``);
    Ray's output omits which, so it is told from the token counts."""
    if error:
        return "error"
    if generated_tokens >= max_tokens or (max_model_len and prompt_tokens + generated_tokens >= max_model_len):
        return "length"
    return "stop"


def _unpark(row: dict[str, Any], keep_logprobs: bool = False, max_model_len: int | None = None,
            classify: bool = False, keep_prompt_token_ids: bool = False) -> dict[str, Any]:
    error = row.get("__inference_error__") or None
    out = {k: v for k, v in row.items() if k not in _DROP and not k.startswith(_PARKED)}
    if keep_prompt_token_ids:  # the ids the engine ran on
        ids = row.get("prompt_token_ids")
        out["prompt_token_ids"] = None if ids is None else [int(i) for i in ids]
    out.update({k[len(_PARKED):]: v for k, v in row.items() if k.startswith(_PARKED)})
    out["generation_error"] = error
    if classify:
        logits = row.get("embeddings")
        out["classifier_logits"] = None if error or logits is None else [float(x) for x in logits]
        out.pop("generated_text", None)
        out.pop("num_generated_tokens", None)
        return out
    out["finish_reason"] = finish_reason(row.get("num_input_tokens") or 0, row.get("num_generated_tokens") or 0,
                                         out["sampling_params"].get("max_tokens") or 0, max_model_len, error)
    if keep_logprobs:
        out["generated_logprobs"] = row.get("logprobs")
    return out


def prompt_tokens_of(engine: Engine) -> Any:
    """The processor's preprocess for ``engine``: rows get their prompt ids, rendered with the template every path
    uses for this model (``chat.prompt_template``, worked out here once)."""
    template = template_for(engine.model, engine.chat_template, engine.trust_remote_code)
    return functools.partial(_park, model=engine.model, template=template, trust_remote_code=engine.trust_remote_code)


def rows_dataset(rows: list[dict[str, Any]], batch_size: int) -> Any:
    """A Ray dataset of rows held in memory (evaluation's requests), in blocks of one engine batch each (the last
    one shorter), in no particular order. Ray's ``from_items`` makes a block of each row (up to 200), and every block
    is a preprocessing task of its own, whose overhead competes with the engine's start: on 2 cores, 150 requests
    took 14.7-16.5 s in one pass against 13.5-13.9 s in blocks of 16, and the demo's evaluation judge pass (304
    requests) 20.6-21.0 s against 18.1-18.9. Blocks of exactly one batch, not ``from_items``' even split: Ray Data
    gathers blocks until they hold a batch before it hands them to an engine (or endpoint caller) as one task, so two
    blocks of 15 would be one task where 16 and 14 are two, which two engines of a pool can share."""
    import ray.data

    parts = [ray.data.from_items(rows[start:start + batch_size], override_num_blocks=1)
             for start in range(0, len(rows), batch_size)] or [ray.data.from_items([])]
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def generate(ds: Any, engine: Engine, hardware: Hardware, keep_logprobs: bool = False, sharing: int = 1,
             keep_prompt_token_ids: bool = False) -> Any:
    """Apply one vLLM engine pool to ``ds`` (lazy: nothing runs until the dataset is consumed or written);
    ``sharing``: how many engine pools run side by side with this one (``engines.side_by_side``)."""
    from ray.data.llm import build_processor

    max_model_len = context_length(engine, hardware)
    processor = build_processor(
        vllm_processor_config(engine, hardware, sharing=sharing),
        preprocess=prompt_tokens_of(engine),
        postprocess=functools.partial(_unpark, keep_logprobs=keep_logprobs, max_model_len=max_model_len,
                                      keep_prompt_token_ids=keep_prompt_token_ids),
    )
    return keep_engines_off_cpu_nodes(processor, hardware)(ds)


def take_side_by_side(passes: list[Any]) -> list[list[dict[str, Any]]]:
    """The rows of each lazy pass (``generate``/``classify`` datasets built with ``sharing=len(passes)``), run as one
    Ray Data execution: their engines start and work side by side instead of one pass after the other."""
    if len(passes) == 1:
        return [passes[0].take_all()]
    tagged = [ds.map(functools.partial(_tag_pass, index=index)) for index, ds in enumerate(passes)]
    rows: list[list[dict[str, Any]]] = [[] for _ in passes]
    for row in tagged[0].union(*tagged[1:]).take_all():
        rows[row.pop("_pass")].append(row)
    return rows


def _tag_pass(row: dict[str, Any], index: int) -> dict[str, Any]:
    return {**row, "_pass": index}


def classify(ds: Any, engine: Engine, hardware: Hardware, sharing: int = 1) -> Any:
    """Apply a sequence-classification model (vLLM's ``classify`` runner) to the chats in ``ds``.

    Each row's ``messages`` ends on the assistant turn to score; vLLM's chat step renders it without a closing
    ``</s>`` and the classifier reads the last token. Rows may carry ``pooling_params`` (e.g. ``use_activation``).
    """
    from ray.data.llm import build_processor

    config = vllm_processor_config(engine, hardware, sharing=sharing, task_type="classify", detokenize_stage=False)
    processor = build_processor(config, preprocess=prompt_tokens_of(engine),
                                postprocess=functools.partial(_unpark, classify=True))
    return keep_engines_off_cpu_nodes(processor, hardware)(ds)
