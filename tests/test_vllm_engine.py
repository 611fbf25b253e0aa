"""The tiny models through a real vLLM engine on this machine's hardware, behind the Zephyr template."""

import subprocess
import sys

import pytest

from zephyr_ray.chat import render_reference
from zephyr_ray.config import Hardware
from zephyr_ray.engines import detect_accelerator, local_llm
from zephyr_ray.tiny import load_corpus

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def teacher_llm(tiny_models):
    """The teacher in a ``vllm.LLM`` as ``zephyr-ray chat`` builds it (the engine in this process on CPU)."""
    llm = local_llm(str(tiny_models["teacher"]), Hardware(accelerator=detect_accelerator()), max_model_len=512,
                    kv_cache_gib=0.5)
    yield llm
    del llm


def test_engine_renders_the_zephyr_prompt_and_stops_at_eos(teacher_llm):
    from vllm import SamplingParams

    rows = load_corpus()[:16]
    prompts = [[m for m in row["messages"] if m["role"] != "assistant"] for row in rows]
    outputs = teacher_llm.chat(prompts, SamplingParams(max_tokens=96, temperature=0.0), use_tqdm=False)
    eos = teacher_llm.get_tokenizer().eos_token_id
    stopped = 0
    for messages, output in zip(prompts, outputs):
        assert output.prompt == render_reference(messages, add_generation_prompt=True)
        completion = output.outputs[0]
        assert completion.text.strip()
        assert "</s>" not in completion.text and "<|user|>" not in completion.text
        if completion.finish_reason == "stop":
            assert completion.token_ids[-1] == eos
            stopped += 1
    assert stopped >= 12, f"only {stopped} of {len(prompts)} replies stopped at </s>"


def test_engine_and_transformers_agree_on_greedy_tokens(teacher_llm, tiny_models):
    """Loaded unchanged: both runtimes pick the same greedy tokens from the same weights."""
    import torch
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    messages = [{"role": "user", "content": "How do plants make food?"}]
    output = teacher_llm.chat([messages], SamplingParams(max_tokens=12, temperature=0.0), use_tqdm=False)[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"])
    ids = torch.tensor([output.prompt_token_ids])
    with torch.no_grad():
        reference = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    assert list(output.outputs[0].token_ids) == reference


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zephyr_ray.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=600)


def test_cli_chat_keeps_the_conversation_on_another_model(tiny_models):
    """Interactive chat with piped turns, on a one-layer random-weight model (a second architecture size)."""
    result = run_cli("chat", str(tiny_models["generator-3"]), "--system", "Be brief.", "--temperature", "0",
                     "--max-tokens", "8", "--kv-cache-gib", "0.5",
                     stdin="Hello there\n/reset\nWhat is two plus two?\n/exit\nnever sent\n")
    assert result.returncode == 0, result.stderr[-3000:]
    replies = [line for line in result.stdout.splitlines() if line.startswith("assistant> ")]
    assert len(replies) == 2 and all(len(r) > len("assistant> ") for r in replies)


def test_cli_chat_refuses_a_directory_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    result = run_cli("chat", str(tmp_path), "-m", "hi")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no .safetensors weights (pickle weights ['pytorch_model.bin'] are not loaded)" in result.stderr
