"""Chat requests to an OpenAI-compatible endpoint over a Ray dataset (the ``openai`` judge; GPT-4-class graders).

Why not ``ray.data.llm.HttpRequestProcessorConfig``: its stage raises when a request has used up its retries and
cannot read a non-JSON error body, so one bad row ends the whole job. Here each Ray worker holds an ``openai``
client (retries with exponential backoff on 429, 5xx and timeouts, honouring ``Retry-After``), paces its requests
to its share of ``qps``, and a request that still fails becomes that row's ``generation_error``, as does an answer
of any shape (content null or not text, a body that is not JSON or is nested too deep); error text is cut to
``ERROR_TEXT_CHARS``. The answers go back to Ray Data as Python values, so text Arrow cannot hold (a lone surrogate)
reaches the stage's writer, which repairs and counts it (``data.conform``).

The API key is read from the environment on the driver when the dataset is built (a missing key fails at once,
naming the variable), travels to the workers as a ``SecretStr`` (its repr is ``**********``), and is scrubbed
from any error text that comes back.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import SecretStr

from .config import Endpoint, EvalJudgeConfig, JudgeConfig


ERROR_TEXT_CHARS = 500  # of an endpoint's error (which quotes its body) kept in a row's error
ENDPOINT_BATCH_ROWS = 16  # rows one endpoint caller takes at a time (its requests run concurrently)


def rows_per_call(judge: JudgeConfig | EvalJudgeConfig) -> int:
    """The rows a judge (the feedback judge's config or the evaluation's) takes at a time: an endpoint caller's
    batch when it asks an endpoint, its engine's batch otherwise; the blocks its requests are made in."""
    return ENDPOINT_BATCH_ROWS if judge.endpoint is not None else judge.engine.batch_size


class EndpointKeyError(ValueError):
    pass


def endpoint_key(endpoint: Endpoint) -> SecretStr | None:
    """The endpoint's API key from its environment variable; an error names the variable (never a value)."""
    if endpoint.api_key_env is None:
        return None
    key = os.environ.get(endpoint.api_key_env)
    if not key:
        raise EndpointKeyError(f"endpoint {endpoint.base_url}: environment variable {endpoint.api_key_env} is not "
                               f"set (set it, or `api_key_env: null` for an endpoint without auth)")
    return SecretStr(key)


class _Pacer:
    """Spaces request starts ``interval`` seconds apart across the threads of one worker."""

    def __init__(self, qps: float) -> None:
        self.interval = 1.0 / qps
        self.next_start = time.monotonic()
        self.lock = threading.Lock()

    def wait(self) -> None:
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_start)
            self.next_start = start + self.interval
        time.sleep(max(0.0, start - now))


class EndpointChat:
    """Ray Data UDF (``map_batches``, pyarrow batches): one chat completion per row.

    Each row carries ``messages`` and ``request``, a JSON object (as text, so any shape survives Arrow) of extra
    fields for ``chat.completions.create``: temperature, max_tokens, response_format, extra_body, ... Adds
    ``generated_text``, ``finish_reason``, ``num_input_tokens``, ``num_generated_tokens`` and ``generation_error``.
    """

    def __init__(self, endpoint: Endpoint, key: SecretStr | None) -> None:
        import openai

        self.endpoint = endpoint
        self.key = key
        self.client = openai.OpenAI(base_url=endpoint.base_url, api_key=key.get_secret_value() if key else "none",
                                    max_retries=endpoint.max_retries, timeout=endpoint.timeout_s)
        self.pacer = _Pacer(endpoint.qps / endpoint.concurrency)
        self.pool = ThreadPoolExecutor(max_workers=endpoint.max_in_flight)

    def _scrub(self, text: str) -> str:
        return text.replace(self.key.get_secret_value(), "**********") if self.key else text

    def _error(self, text: str) -> str:
        """An error for the row: the key scrubbed, then cut to ``ERROR_TEXT_CHARS`` (an error body can be huge)."""
        text = self._scrub(text)
        return text if len(text) <= ERROR_TEXT_CHARS else text[:ERROR_TEXT_CHARS] + f"... [{len(text)} characters]"

    def _one(self, row: dict[str, Any]) -> dict[str, Any]:
        import openai

        self.pacer.wait()
        out = {"generated_text": None, "finish_reason": "error", "num_input_tokens": None,
               "num_generated_tokens": None, "generation_error": None}
        try:
            response = self.client.chat.completions.create(model=self.endpoint.model, messages=row["messages"],
                                                           **json.loads(row["request"]))
            out.update(_read_answer(response))
        except openai.APIStatusError as error:
            out["generation_error"] = self._error(f"HTTP {error.status_code} from {self.endpoint.base_url}: "
                                                  f"{error.message}")
        except openai.APIError as error:  # connection failures and timeouts, after the retries
            out["generation_error"] = self._error(f"{type(error).__name__} from {self.endpoint.base_url}: "
                                                  f"{error.message}")
        except Exception as error:  # an answer of any other shape (a body nested too deep, ...): this row's error
            out["generation_error"] = self._error(f"unreadable answer from {self.endpoint.base_url}: "
                                                  f"{type(error).__name__}: {error}")
        return {**row, **out}

    def __call__(self, batch: Any) -> Any:
        rows = list(self.pool.map(self._one, batch.to_pylist()))
        # Python columns, not an Arrow table: an answer with text Arrow cannot hold (a lone surrogate) stays a
        # Python value until the stage's writer repairs and counts it (``data.conform``)
        return {name: [row[name] for row in rows] for name in rows[0]} if rows else batch


def _token_count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63 else None


def _read_answer(response: Any) -> dict[str, Any]:
    """The answer's text, finish reason and token counts, whatever shape the endpoint gave its JSON (the ``openai``
    client builds its objects without validating them): content that is missing, null or not text is the row's
    ``generation_error``; odd counts are None."""
    choices = getattr(response, "choices", None)
    choice = choices[0] if isinstance(choices, list) and choices else None
    content = getattr(getattr(choice, "message", None), "content", None)
    usage = getattr(response, "usage", None)
    out = {"num_input_tokens": _token_count(getattr(usage, "prompt_tokens", None)),
           "num_generated_tokens": _token_count(getattr(usage, "completion_tokens", None))}
    if content is None:
        out["generation_error"] = "the endpoint returned no message content"
    elif not isinstance(content, str):
        out["generation_error"] = f"the endpoint's message content is {type(content).__name__}, not text"
    else:
        finish_reason = getattr(choice, "finish_reason", None)
        out.update(generated_text=content, finish_reason=finish_reason if isinstance(finish_reason, str) else None)
    return out


def sampling_fields(sampling: dict[str, Any]) -> dict[str, Any]:
    """A ``Sampling`` section as ``chat.completions.create`` fields (the seed only when one is set)."""
    fields = {"temperature": sampling["temperature"], "top_p": sampling["top_p"], "max_tokens": sampling["max_tokens"]}
    if sampling.get("seed") is not None:
        fields["seed"] = sampling["seed"]
    return fields


def chat_via_endpoint(ds: Any, endpoint: Endpoint, batch_size: int = ENDPOINT_BATCH_ROWS) -> Any:
    """Lazily add the endpoint's answer to every row of ``ds`` (see ``EndpointChat``)."""
    key = endpoint_key(endpoint)
    return ds.map_batches(EndpointChat, fn_constructor_kwargs={"endpoint": endpoint, "key": key},
                          batch_format="pyarrow", batch_size=batch_size, concurrency=endpoint.concurrency,
                          num_cpus=0.25)
