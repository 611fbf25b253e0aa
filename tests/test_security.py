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


def asgi_exchange(app, scope: dict, messages: list[dict]) -> list[dict]:
    """Run ``app`` on one request whose client sends ``messages`` (then waits, as a client does); what it sent."""
    import asyncio

    sent, queue = [], list(messages)

    async def receive() -> dict:
        if queue:
            return queue.pop(0)
        await asyncio.Event().wait()  # a client that sent everything sends nothing more

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def test_the_key_guard_leaves_health_open_under_serves_route_prefix_and_nothing_else(monkeypatch):
    """An app at a route prefix (Serve's ``root_path``): its ``/health`` answers without the key, as at ``/``;
    every other route, and a path that only looks like it, needs the key; the page's 401 alone asks for a login."""
    from fastapi.testclient import TestClient
    from starlette.requests import Request

    from zephyr_ray.config import ServeConfig, ServedModel
    from zephyr_ray.serving import build_fastapi_app, key_refused, route_of

    monkeypatch.setenv("ZR_TEST_GUARD_KEY", "the-key")

    def refused(path: str, root: str = "", key: str | None = None) -> bool:
        headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
        scope = {"type": "http", "method": "GET", "path": root + path, "root_path": root, "headers": headers}
        return key_refused("ZR_TEST_GUARD_KEY", Request(scope))

    assert not refused("/health") and not refused("/health", root="/open")
    assert refused("/v1/models", root="/open") and refused("/open/health") and refused("health", root="/open")
    assert route_of({"path": "/openv1/models", "root_path": "/open"}) == "/openv1/models"  # not under /open
    assert route_of({"path": "/open", "root_path": "/open/"}) == "/" == route_of({"path": "/", "root_path": ""})
    assert refused("/v1/models", root="/open", key="wrong") and not refused("/v1/models", root="/open", key="the-key")
    # the ingress's app at the prefix: the page's 401 asks the browser for the key, the API's does not
    app = build_fastapi_app(ServeConfig(models=[ServedModel(model_id="m", model="unused")],
                                        api_key_env="ZR_TEST_GUARD_KEY"))
    client = TestClient(app, root_path="/open")
    api, page = client.get("/open/v1/models"), client.get("/open/")
    assert api.status_code == page.status_code == 401 and "WWW-Authenticate" not in api.headers
    assert page.headers["WWW-Authenticate"].startswith("Basic")
    monkeypatch.delenv("ZR_TEST_GUARD_KEY")
    assert not refused("/v1/models", root="/open"), "no key configured: nothing is refused"


def test_direct_streaming_answers_the_ingress_routes_only_and_leaves_vllm_what_it_cannot_check(monkeypatch):
    """vLLM's own app behind `direct_routes_middleware` (a stand-in app records what reaches it): routes the ingress
    lacks get 404 and WebSockets are closed unheard; bad requests are refused as the ingress refuses them; a body
    the checks cannot read (wrong types, 100,000-deep JSON) and a client gone mid-body reach vLLM's app as sent;
    Serve's route prefix is taken off; and the replica refuses to start where VLLM_API_KEY is set."""
    import asyncio
    import json
    from types import SimpleNamespace

    from zephyr_ray.config import ServeConfig
    from zephyr_ray.serving import direct_routes_middleware, direct_server_class

    reached = []

    async def vllm_app(scope, receive, send):
        messages = [await receive()]
        while messages[-1]["type"] == "http.request" and messages[-1].get("more_body"):
            messages.append(await receive())
        reached.append((scope["path"], messages))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    app = direct_routes_middleware({"m"}, 2.0)(vllm_app)

    def post(path: str, *chunks: bytes, root: str = "", method: str = "POST", gone: bool = False):
        reached.clear()
        messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1 or gone}
                    for i, c in enumerate(chunks or (b"",))] + ([{"type": "http.disconnect"}] if gone else [])
        scope = {"type": "http", "method": method, "path": root + path, "root_path": root, "headers": []}
        sent = asgi_exchange(app, scope, messages)
        status = sent[0]["status"]
        return status, json.loads(sent[1]["body"]) if status != 200 else None

    for path in ("/tokenize", "/v1/responses", "/v1/chat/completions/batch", "/metrics", "/scale_elastic_ep"):
        status, body = post(path, b'{"model": "m"}')
        assert status == 404 and body["error"]["type"] == "not_found_error" and not reached, path
    assert post("/v1/models/m", method="GET", root="/zephyr")[0] == 200 and reached[0][0] == "/zephyr/v1/models/m"
    assert post("/v1/completions", method="GET", root="/zephyr")[0] == 200  # a GET is vLLM's to answer

    status, body = post("/v1/chat/completions", b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], ',
                        b'"temperature": 9}')
    assert status == 400 and body["error"]["param"] == "temperature" and not reached
    assert post("/v1/completions", b'{"model": "other", "prompt": "hi"}')[1]["error"]["param"] == "model"
    good = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    assert post("/v1/chat/completions", good[:10], good[10:])[0] == 200
    assert b"".join(m["body"] for m in reached[0][1]) == good  # the body as it came, in its chunks
    for unread in (b'{"model": "m", "temperature": "hot"}', b'{"model": ["m"]}', b"[" * 100_000 + b"]" * 100_000,
                   b"\xff not json"):
        assert post("/v1/chat/completions", unread)[0] == 200 and reached, unread[:20]
    assert post("/v1/chat/completions", b'{"model": "m", "mess', gone=True)[0] == 200
    assert [m["type"] for m in reached[0][1]] == ["http.request", "http.disconnect"]

    sent = asgi_exchange(app, {"type": "websocket", "path": "/v1/realtime", "root_path": "", "headers": []},
                         [{"type": "websocket.connect"}])
    assert sent == [{"type": "websocket.close", "code": 1008}]

    monkeypatch.setenv("VLLM_API_KEY", "another-key")
    server = direct_server_class(ServeConfig(direct_streaming=True), require_key=False)
    with pytest.raises(RuntimeError, match="VLLM_API_KEY is set where this replica runs"):  # before the engine
        asyncio.run(server.__init__(SimpleNamespace(), None))
