"""The security defaults of SECURITY.md, checked where they are decided: no remote code unless a recipe says so,
weights from safetensors only (engines and training), recipes read without Python tags."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from zephyr_ray.config import Engine, Hardware, RecipeError, TrainSFTConfig, load_recipe
from zephyr_ray.engines import check_model_dir, vllm_engine_kwargs
from zephyr_ray.train.loop import model_init_kwargs


@pytest.mark.parametrize("accelerator", ["cpu", "gpu"])
def test_engines_load_safetensors_and_no_remote_code_unless_the_recipe_says_so(accelerator):
    hardware = Hardware(accelerator=accelerator)
    kwargs = vllm_engine_kwargs(Engine(model="m"), hardware)
    assert kwargs["load_format"] == "safetensors" and kwargs["trust_remote_code"] is False
    assert vllm_engine_kwargs(Engine(model="m", trust_remote_code=True), hardware)["trust_remote_code"] is True


def test_training_refuses_pickled_weights(tiny_models, tmp_path):
    """A model directory holding only pytorch_model.bin (a pickle) is not loaded by training's model loader."""
    from transformers import AutoModelForCausalLM

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_models["student"], pickled)
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    kwargs = model_init_kwargs(TrainSFTConfig(learning_rate=1e-5, global_batch_size=8), Hardware(accelerator="cpu"))
    assert kwargs["trust_remote_code"] is False and kwargs["use_safetensors"] is True
    with pytest.raises(OSError, match="safetensors"):
        AutoModelForCausalLM.from_pretrained(pickled, **kwargs)
    assert AutoModelForCausalLM.from_pretrained(tiny_models["student"], **kwargs) is not None
    assert check_model_dir(str(pickled)) == [f"{pickled}: no .safetensors weights (pickle weights "
                                             "['pytorch_model.bin'] are not loaded)"]


def test_recipes_cannot_construct_python_objects(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "recipe.yaml"
    path.write_text(f"name: x\nhardware: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(RecipeError, match="could not determine a constructor"):
        load_recipe(path)
    assert not marker.exists()


def test_a_chunked_body_over_the_limit_is_refused_before_the_app_reads_it(caplog, monkeypatch):
    """The Serve ingress's body limit (``serving.body_limit_middleware``, outermost) on an ASGI app: a chunked body
    (no Content-Length) over the limit gets 413 and the endpoint never runs (stopped mid-read, it logged the
    client's disconnect as an error with a traceback); one under the limit reaches it whole; a stated length
    passes through to the guard that checks it after the API key."""
    import logging

    from fastapi import FastAPI, Request
    from fastapi.testclient import TestClient

    from zephyr_ray.serving import body_limit_middleware

    monkeypatch.delenv("ZEPHYR_RAY_NO_SUCH_KEY", raising=False)  # no key: every body is counted
    app, seen = FastAPI(), []

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        seen.append(await request.body())
        return {"bytes": len(seen[-1])}

    app.add_middleware(body_limit_middleware(100, "ZEPHYR_RAY_NO_SUCH_KEY"))
    client = TestClient(app)
    with caplog.at_level(logging.DEBUG):
        refused = client.post("/echo", content=iter([b"x" * 60, b"x" * 60]))
        assert refused.status_code == 413 and "over 100 bytes" in refused.json()["error"]["message"]
        assert seen == [] and not [r for r in caplog.records if r.levelno >= logging.ERROR]
        whole = client.post("/echo", content=iter([b"x" * 40, b"y" * 40]))
        assert whole.status_code == 200 and seen == [b"x" * 40 + b"y" * 40]
        stated = client.post("/echo", content=b"z" * 30)  # Content-Length: 30
        assert stated.status_code == 200 and seen[-1] == b"z" * 30


def test_a_body_without_the_key_is_refused_unread(monkeypatch):
    """The ingress's app (``serving.build_fastapi_app``: Ray Serve LLM's app and our middleware) with a key
    configured: a chunked body without the key gets 401 before a byte of it is read (the body limit used to hold it
    first: 413 after reading 2 MiB); with the key, the same body is counted and refused at the limit."""
    from fastapi.testclient import TestClient

    from zephyr_ray.config import ServeConfig, ServedModel
    from zephyr_ray.serving import build_fastapi_app

    monkeypatch.setenv("ZEPHYR_RAY_TEST_KEY", "the-key")
    app = build_fastapi_app(ServeConfig(models=[ServedModel(model_id="m", model="unused")],
                                        api_key_env="ZEPHYR_RAY_TEST_KEY"))
    client, read = TestClient(app), []

    def chunks():
        for index in range(3):
            read.append(index)
            yield b"x" * 2**20

    refused = client.post("/v1/chat/completions", content=chunks())
    assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    assert read == [], f"{len(read)} MiB of a body read for a request without the key"
    too_big = client.post("/v1/chat/completions", content=chunks(), headers={"Authorization": "Bearer the-key"})
    assert too_big.status_code == 413 and too_big.json()["error"]["param"] == "body"
