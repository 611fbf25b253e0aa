"""The finished model on Ray Serve: ``ray.serve.llm`` (vLLM) behind an OpenAI-compatible ingress of our own.

The ingress is Ray Serve LLM's ``OpenAiIngress`` (``/v1/chat/completions`` with server-sent-event streaming,
``/v1/completions``, ``/v1/models``) on Ray's own FastAPI app (its request ids, error format and HTTP metrics), with
what a public endpoint needs in front of it:

- an API key: when the variable named by ``serve.api_key_env`` is set, every route but ``/health`` needs
  ``Authorization: Bearer <key>`` (or HTTP Basic with the key as password, which the chat page's browser sends by
  itself); keys are compared in constant time and never logged. The key is read from the environment of the process
  that runs the ingress, never passed through Ray, so it shows in no Serve config or dashboard;
- checks that answer a bad request with a 4xx naming the field, before it reaches an engine, and a body limit
  (``serve.max_request_bytes``, by ``Content-Length`` or counted as a chunked body arrives);
- ``/health`` (200 once every model can answer, else 503, as vLLM's server) and the chat page at ``/``.

Each model's chat template is the one saved with it (vLLM applies the tokenizer's template); autoscaling is set from
the recipe, as Ray Serve LLM's default target never scales up.

With ``serve.direct_streaming`` (one model) there is no ingress deployment: the model's replica serves vLLM's own
OpenAI app, and the same key, size limit, request checks, routes and chat page are put in front of that app
(``direct_server_class``); Serve's proxy, or HAProxy where Serve runs it, sends requests straight to a replica.
"""

# No `from __future__ import annotations` here: FastAPI reads the request types of the ingress' route methods
# from their annotations at run time, and those classes are imported inside ``ingress_class``.
import base64
import errno
import hmac
import logging
import os
import socket
from importlib import resources
from pathlib import Path
from typing import Any

from ray.llm._internal.common.callbacks.base import CallbackBase

from .chat import template_for, template_text
from .config import Hardware, Recipe, ServeConfig, ServedModel
from .engines import check_model_dir, local_path_or_hub_id, placement_bundles, vllm_engine_kwargs

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
OPEN_ROUTES = ("/health",)  # reachable without the key: load balancers and probes
APP_NAME = "zephyr"
HAPROXY_SETTING = "RAY_SERVE_ENABLE_HA_PROXY"  # Serve's HTTP through HAProxy (the binary ``ray[serve]`` ships)


def final_model(run_dir: Path) -> Path | None:
    """The recipe's last trained model in ``run_dir``: dDPO's, else dSFT's (None when neither is finished)."""
    from .data import is_complete

    for stage in ("train_dpo", "train_sft"):
        if is_complete(run_dir / stage / "model"):
            return run_dir / stage / "model"
    return None


def model_source(served: ServedModel, run_dir: Path | None) -> str:
    if served.model is not None:
        return served.model
    model = final_model(run_dir) if run_dir is not None else None
    if model is None:
        raise FileNotFoundError(f"serve: model '{served.model_id}' names no `model` and {run_dir} holds no finished "
                                "train_dpo/model or train_sft/model")
    return str(model)


class LocalModelCallback(CallbackBase):
    """Ray Serve LLM's node-initialization hook for a model directory on local or shared disk: there is nothing to
    download, so the replica skips Ray's download task, a process per node that imports vLLM only to find the
    files in place (~16 s of a replica's start on 2 cores). Hub and cloud models keep Ray's download."""

    async def on_before_node_init(self) -> None:
        self.ctx.run_init_node = False


def served_template(engine: Any) -> str | None:
    """The template every path renders with (``chat.prompt_template``; vLLM's chat API encodes without special
    tokens, like the others). A hub model whose tokenizer cannot be read here (offline) gets the recipe's template
    as written, or its own, and a warning."""
    try:
        return template_for(engine.model, engine.chat_template, engine.trust_remote_code)
    except OSError as err:
        logger.warning("serve: cannot read %s's tokenizer here (%s); its prompt is not checked for a BOS",
                       engine.model, str(err).splitlines()[0])
        return template_text(engine.chat_template)


def llm_config(served: ServedModel, source: str, hardware: Hardware) -> Any:
    """Ray Serve LLM's config for one model: vLLM settings as the generation stages use them, autoscaling from the
    recipe."""
    from ray.serve.llm import LLMConfig

    source = local_path_or_hub_id(source)  # replicas run in other directories
    local = Path(source).expanduser().exists()  # else a hub id, or a path only the serving nodes have
    if local and (problems := check_model_dir(source)):
        raise ValueError("; ".join(problems))
    engine = served.engine(source)
    template = served_template(engine)
    return LLMConfig(
        model_loading_config={"model_id": served.model_id, "model_source": engine.model},
        engine_kwargs={**vllm_engine_kwargs(engine, hardware), **({"chat_template": template} if template else {})},
        placement_group_config={"bundles": placement_bundles(engine, hardware)},
        deployment_config={
            "autoscaling_config": {"min_replicas": served.min_replicas, "max_replicas": served.max_replicas,
                                   "initial_replicas": max(1, served.min_replicas),
                                   "target_ongoing_requests": served.target_ongoing_requests,
                                   "upscale_delay_s": served.upscale_delay_s,
                                   "downscale_delay_s": served.downscale_delay_s},
            "max_ongoing_requests": served.max_ongoing_requests,
            # on CPU the replica actor only relays to the engine process, which holds the bundle's CPU
            **({"ray_actor_options": {"num_cpus": 0}} if hardware.accelerator == "cpu" else {}),
        },
        log_engine_metrics=True,
        **({"callback_config": {"callback_class": LocalModelCallback}} if local else {}),
    )


def openai_error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> Any:
    """A JSON response in OpenAI's error format (what the ``openai`` client turns into its exceptions)."""
    from starlette.responses import JSONResponse

    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param,
                                                               "code": status}})


def request_problem(body: Any, known_models: set[str], max_temperature: float) -> tuple[str, str] | None:
    """(field, message) for the first thing wrong with a chat or completion request, else None."""
    if body.model not in known_models:
        return "model", f"model '{body.model}' is not served here; models: {sorted(known_models)}"
    messages = getattr(body, "messages", None)
    if messages is not None:
        if not messages:
            return "messages", "messages must hold at least one message"
        for i, message in enumerate(messages):
            message = message if isinstance(message, dict) else dict(message)
            if (role := message.get("role")) not in ROLES:
                return f"messages[{i}].role", f"role '{role}' is not one of {list(ROLES)}"
            if not isinstance(message.get("content"), str):
                return f"messages[{i}].content", "content must be a string (text models only)"
    for field in ("max_tokens", "max_completion_tokens"):
        value = getattr(body, field, None)
        if value is not None and value < 1:
            return field, f"{field} must be at least 1, got {value}"
    temperature = getattr(body, "temperature", None)
    if temperature is not None and not 0.0 <= temperature <= max_temperature:
        return "temperature", f"temperature must be within [0, {max_temperature}], got {temperature}"
    top_p = getattr(body, "top_p", None)
    if top_p is not None and not 0.0 < top_p <= 1.0:
        return "top_p", f"top_p must be within (0, 1], got {top_p}"
    n = getattr(body, "n", None)
    if n is not None and not 1 <= n <= 16:
        return "n", f"n must be within [1, 16], got {n}"
    return None


TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def field_path(loc: tuple) -> str:
    """A pydantic error location as the request field it names: ('body', 'messages', 0, 'SomeUnionMember',
    'content', 'str') -> 'messages[0].content' (union members and type tags dropped)."""
    path = ""
    for item in loc[1:] if loc and loc[0] in ("body", "query") else loc:
        if isinstance(item, int):
            path += f"[{item}]" if path else ""
        elif item[:1].isupper() or "[" in item or "-" in item or item in TYPE_TAGS:
            continue
        else:
            path += f".{item}" if path else item
    return path or "body"


def presented_key(authorization: str) -> str:
    """The key in an ``Authorization`` header: ``Bearer <key>``, or HTTP Basic with the key as the password."""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return ""
    return ""


def chat_page() -> str:
    return resources.files("zephyr_ray.resources").joinpath("chat.html").read_text(encoding="utf-8")


def key_refused(api_key_env: str, request: Any) -> bool:
    """Whether ``request`` lacks the API key the app requires (the key in ``api_key_env``; none set: nothing is
    refused; ``OPEN_ROUTES`` are open, under Serve's route prefix too). From the headers alone, so it is decided
    before any body is read."""
    key = os.environ.get(api_key_env)
    presented = presented_key(request.headers.get("authorization", ""))
    return bool(key) and route_of(request.scope) not in OPEN_ROUTES and not hmac.compare_digest(presented.encode(),
                                                                                                key.encode())


async def held_body(receive: Any, max_bytes: int | None = None) -> tuple[list[dict], str]:
    """A request's body messages, read before the app reads them, and how the read ended: "whole", "left" (the
    client disconnected; its message is the last one held) or "over" (past ``max_bytes``; the rest left unread)."""
    held, received = [], 0
    while True:
        message = await receive()
        held.append(message)
        if message["type"] != "http.request":
            return held, "left"
        received += len(message.get("body", b""))
        if max_bytes is not None and received > max_bytes:
            return held, "over"
        if not message.get("more_body"):
            return held, "whole"


def replayed(held: list[dict], receive: Any) -> Any:
    """An ASGI ``receive`` that gives the held messages as they came, then the client's own (a disconnect)."""

    async def receive_again() -> dict:
        return held.pop(0) if held else await receive()

    return receive_again


def body_limit_middleware(max_bytes: int, api_key_env: str) -> Any:
    """An ASGI middleware that reads the request body before the app does and answers 413 past ``max_bytes``.

    The guard below refuses an over-long ``Content-Length`` at once (after the API key); a chunked body states no
    length, so this one counts it: it holds such a body (at most ``max_bytes``) and hands it to the app only when it
    is whole, so the app never starts on a body that will be refused (stopped mid-read, the app logged the client's
    disconnect as an error with its traceback, for a request that got its 413). A request without the key is passed
    on unread, for the guard's 401: a client without the key never has a body held for it."""
    from starlette.requests import Request

    class BodyLimit:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
            if scope["type"] != "http" or any(name == b"content-length" for name, _ in scope["headers"]) \
                    or key_refused(api_key_env, Request(scope)):
                return await self.app(scope, receive, send)
            held, outcome = await held_body(receive, max_bytes)
            if outcome == "left":  # the client left before its body was whole
                return None
            if outcome == "over":
                return await openai_error(413, f"request body over {max_bytes} bytes", param="body")(
                    scope, receive, send)
            return await self.app(scope, replayed(held, receive), send)

    return BodyLimit


async def readiness() -> tuple[bool, str]:
    """Whether the application this ingress belongs to can answer: every deployment in it (each model's
    ``LLMServer``) has a running replica, in Serve's controller's own count. ``/health`` says so, as vLLM's server
    does, because a load balancer or a script waits for it before sending requests: a 200 from the ingress alone
    would send them while the engine still loads (minutes on a 7B model). A model with one replica of two lost still
    answers: ready. The controller is asked from a thread, not through the model's replica, so the answer does not
    queue behind the requests it serves."""
    import asyncio

    from ray import serve

    app_name = serve.get_replica_context().app_name
    app = (await asyncio.to_thread(serve.status)).applications.get(app_name)
    if app is None:
        return False, "not deployed"
    ready = bool(app.deployments) and all(d.replica_states.get("RUNNING", 0) > 0 for d in app.deployments.values())
    return ready, "ok" if ready else app.status.lower()


def add_guards(app: Any, config: ServeConfig) -> None:
    """What every app of ours puts in front of its routes: the API key, the body size limit (both before any body
    is read), and the chat page at ``/``."""
    from fastapi import Request
    from starlette.responses import HTMLResponse, Response

    api_key_env, max_bytes = config.api_key_env, config.max_request_bytes

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        if key_refused(api_key_env, request):
            response = openai_error(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                                    kind="authentication_error")
            if not route_of(request.scope).startswith("/v1/"):  # the chat page: let the browser ask for it
                response.headers["WWW-Authenticate"] = 'Basic realm="zephyr-ray", charset="UTF-8"'
            return response
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_bytes):
            return openai_error(413, f"request body over {max_bytes} bytes", param="body")
        return await call_next(request)

    # added last: outermost, it sees the raw body stream
    app.add_middleware(body_limit_middleware(max_bytes, api_key_env))

    page = chat_page()

    @app.get("/", response_class=HTMLResponse)
    async def chat() -> HTMLResponse:
        return HTMLResponse(page)


def build_fastapi_app(config: ServeConfig) -> Any:
    """Ray Serve LLM's FastAPI app (its middleware: request ids, errors, HTTP metrics) plus ours: body size limit and
    the API key, and the open routes."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from ray.llm._internal.serve.core.ingress.ingress import init as ray_llm_fastapi_app
    from starlette.responses import JSONResponse, Response

    app = ray_llm_fastapi_app()
    add_guards(app, config)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> Response:
        first = error.errors()[0] if error.errors() else {"loc": ("body",), "msg": "invalid request"}
        field = field_path(tuple(first.get("loc", ("body",))))
        return openai_error(400, f"{field}: {first.get('msg', 'invalid value')}", param=field)

    @app.get("/health")
    async def health() -> Response:
        ready, status = await readiness()
        return JSONResponse({"status": status}, status_code=200 if ready else 503)

    return app


def problem_response(body: Any, known_models: set[str], max_temperature: float) -> Any:
    """``request_problem``'s finding as the response that refuses the request (404 for the model), else None."""
    problem = request_problem(body, known_models, max_temperature)
    if problem is None:
        return None
    field, message = problem
    return openai_error(404 if field == "model" else 400, message, param=field,
                        kind="invalid_request_error" if field != "model" else "not_found_error")


CHECKED_ROUTES = ("/v1/chat/completions", "/v1/completions")
DIRECT_ROUTES = ("/", "/health", "/v1/models", *CHECKED_ROUTES)  # the ingress' own; plus /v1/models/<id>


def route_of(scope: dict) -> str:
    """A request's path inside the app: Serve's route prefix (the scope's ``root_path``) taken off where it ends a
    path segment, as Starlette's routing takes it off (``/openv1`` is not under ``/open``)."""
    path, root = scope["path"], scope.get("root_path", "").rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root):] or "/"
    return path


def direct_routes_middleware(known_models: set[str], max_temperature: float) -> Any:
    """An ASGI middleware for vLLM's own app under direct streaming: it answers only the routes the ingress has
    (vLLM's app has many more: tokenizer, responses, batch, scaling, metrics; each 404 here, a WebSocket closed),
    and holds a chat or completion request's body (the size guard outside it has bounded it) to refuse it as the
    ingress' checks do, before vLLM's app parses it. Bodies that are not a JSON object or hold a field of the wrong
    type go on to vLLM's validation, which names it; a client that leaves mid-body, its disconnect with it."""
    import json
    from types import SimpleNamespace

    class DirectRoutes:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008})
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            route = route_of(scope)
            if route not in DIRECT_ROUTES and not route.startswith("/v1/models/"):
                return await openai_error(404, f"no route {route} here; routes: {list(DIRECT_ROUTES)}",
                                          kind="not_found_error")(scope, receive, send)
            if scope["method"] != "POST" or route not in CHECKED_ROUTES:
                return await self.app(scope, receive, send)
            held, outcome = await held_body(receive)  # if the client left, the app gets its disconnect
            refusal = None
            if outcome == "whole":
                try:
                    body = json.loads(b"".join(message.get("body", b"") for message in held))
                    refusal = problem_response(SimpleNamespace(**{"model": None, **body}), known_models,
                                               max_temperature) if isinstance(body, dict) else None
                except (ValueError, TypeError, RecursionError):  # vLLM's validation says what is wrong
                    refusal = None
            if refusal is not None:
                return await refusal(scope, receive, send)
            return await self.app(scope, replayed(held, receive), send)

    return DirectRoutes


def ingress_class(config: ServeConfig) -> Any:
    """Ray Serve LLM's ``OpenAiIngress`` with request checks in front of chat and completions."""
    from fastapi import Request
    from ray.serve.llm.ingress import OpenAiIngress
    from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

    max_temperature, api_key_env = config.max_temperature, config.api_key_env

    class ZephyrIngress(OpenAiIngress):
        def __init__(self, llm_deployments: dict, model_cards: dict, *, lora_paths: dict | None = None,
                     require_key: bool = False) -> None:
            if require_key and not os.environ.get(api_key_env):
                raise key_missing_error(api_key_env)
            super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
            self._served = set(llm_deployments)

        def _check(self, body: Any) -> Any:
            return problem_response(body, self._served, max_temperature)

        async def chat(self, body: ChatCompletionRequest, request: Request) -> Any:
            return self._check(body) or await super().chat(body, request)

        async def completions(self, body: CompletionRequest, request: Request) -> Any:
            return self._check(body) or await super().completions(body, request)

    return ZephyrIngress


def key_missing_error(api_key_env: str) -> RuntimeError:
    return RuntimeError(f"the app was built with {api_key_env} set, but it is not set where this replica runs: set "
                        "it on the cluster's nodes (refusing to serve without the key)")


def direct_server_class(config: ServeConfig, require_key: bool) -> Any:
    """Ray Serve LLM's ``LLMServer`` as the HTTP ingress itself (direct streaming): it serves vLLM's own OpenAI app,
    to which this adds what the ingress would check: the API key, the size limit, the ingress' routes only, the
    request checks (vLLM's app then validates the rest) and the chat page. vLLM's ``/health`` stays: a replica's
    app exists only once its engine answers."""
    from ray.serve.llm.deployment import LLMServer

    known_models, max_temperature = {config.models[0].model_id}, config.max_temperature

    class ZephyrDirectServer(LLMServer):
        async def __init__(self, llm_config: Any, **kwargs: Any) -> None:
            if require_key and not os.environ.get(config.api_key_env):
                raise key_missing_error(config.api_key_env)
            if os.environ.get("VLLM_API_KEY"):  # vLLM's app would check it too, Bearer only (the page sends Basic)
                raise RuntimeError(f"VLLM_API_KEY is set where this replica runs: unset it; the endpoint's key is "
                                   f"{config.api_key_env}")
            await super().__init__(llm_config, **kwargs)

        async def __serve_build_asgi_app__(self) -> Any:
            app = await super().__serve_build_asgi_app__()
            app.middleware_stack = None  # built already by vLLM's app; Starlette adds middleware only before
            app.add_middleware(direct_routes_middleware(known_models, max_temperature))  # innermost: keyed only
            add_guards(app, config)
            return app

    return ZephyrDirectServer


def direct_streaming_app(config: ServeConfig, llm: Any) -> Any:
    """The one model's ``LLMServer`` deployment as the app's ingress. Where Serve runs HAProxy
    (``RAY_SERVE_ENABLE_HA_PROXY=1``, read as Ray's own check reads it: in the process that builds the app, which for
    ``serve deploy`` runs on the cluster), with Ray Serve LLM's request router beside it, which HAProxy asks for a
    replica: what ``build_openai_app`` builds under ``RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1``, with our server
    class. Without HAProxy (Serve refuses that router then), Serve's own proxy routes to a replica."""
    from ray.llm._internal.serve.core.ingress.builder import (
        _build_direct_streaming_llm_deployment,
        _build_openai_ingress_request_router,
    )
    from ray.serve._private.constants import RAY_SERVE_ENABLE_HA_PROXY

    server_class = direct_server_class(config, require_key=bool(os.environ.get(config.api_key_env)))
    server = _build_direct_streaming_llm_deployment(llm, deployment_cls=server_class, name_prefix="LLMServer:")
    if not RAY_SERVE_ENABLE_HA_PROXY:
        logger.info("serve: direct streaming without HAProxy (%s is not set where the app is built): Serve's proxy "
                    "routes to the replica, which saves little over the ingress; set %s=1 where Ray starts for "
                    "HAProxy", HAPROXY_SETTING, HAPROXY_SETTING)
        return server
    return server._with_ingress_request_router(_build_openai_ingress_request_router(server=server, llm_config=llm))


def build_app(config: ServeConfig, hardware: Hardware, run_dir: Path | None = None) -> Any:
    """The Serve application: one ``LLMServer`` deployment per model behind one ingress (or, with
    ``direct_streaming``, the one model's deployment as the ingress)."""
    from ray import serve
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS
    from ray.serve.llm import build_llm_deployment
    from ray.serve.llm.ingress import make_fastapi_ingress

    configs = [llm_config(m, model_source(m, run_dir), hardware) for m in config.models]
    if config.direct_streaming:
        return direct_streaming_app(config, configs[0])
    ingress = ingress_class(config)
    options = ingress.get_deployment_options(configs)
    if hardware.accelerator == "cpu":
        options["ray_actor_options"] = {"num_cpus": 0.5}  # the ingress only relays; leave the cores to vLLM
    deployment = make_fastapi_ingress(ingress, endpoint_map={k: DEFAULT_ENDPOINTS[k] for k in
                                                             ("models", "model_data", "completions", "chat")},
                                      app=build_fastapi_app(config))
    require_key = bool(os.environ.get(config.api_key_env))
    return serve.deployment(deployment, name="ZephyrIngress", **options).bind(
        llm_deployments={c.model_id: build_llm_deployment(c) for c in configs},
        model_cards={c.model_id: to_model_metadata(c.model_id, c) for c in configs},
        require_key=require_key,
    )


PROJECT_DIR = Path(__file__).resolve().parents[1]  # the checkout (or image directory) an editable install runs from


def located(value: str) -> Path | None:
    """A path a Serve config names, absolute: as given, or from the working directory, or else inside this project
    (``jobs/``, ``artifacts/``, ``runs/`` of the checkout or image the package runs from), because Serve builds the
    app in a process whose working directory is not the one ``serve run`` was typed in. None when found nowhere."""
    path = Path(value).expanduser()
    for candidate in (path,) if path.is_absolute() else (Path.cwd() / path, PROJECT_DIR / path):
        if candidate.exists():
            return candidate.resolve()
    return None


def app_builder(args: dict[str, Any]) -> Any:
    """For ``serve run`` / ``serve deploy`` (``import_path: zephyr_ray.serving:app_builder``). ``args``: ``recipe``
    (its ``serve`` and ``hardware`` sections), and ``run_dir`` (whose final model is served) or ``model`` (a model
    directory or hub id for the first served model). Relative paths: see ``located``."""
    from .config import load_recipe

    recipe_path = located(str(args["recipe"]))
    if recipe_path is None:
        raise FileNotFoundError(f"recipe: {args['recipe']} is neither under the working directory ({Path.cwd()}) "
                                f"nor under the project ({PROJECT_DIR}); give an absolute path")
    recipe: Recipe = load_recipe(recipe_path)
    config = recipe.serve or ServeConfig()
    if args.get("model"):
        model = str(located(str(args["model"])) or args["model"])  # else a hub id
        config = config.model_copy(update={"models": [config.models[0].model_copy(update={"model": model}),
                                                      *config.models[1:]]})
    run_dir = None
    if args.get("run_dir"):
        run_dir = located(str(args["run_dir"])) or Path(args["run_dir"]).resolve()
    return build_app(config, recipe.hardware, run_dir)


def port_in_use(host: str, port: int) -> bool:
    """Whether something on this machine listens on ``host:port`` (on it, or on every interface). Ray Serve's proxy
    binds with ``SO_REUSEPORT``, so a second Serve (another Ray cluster's, say another `zephyr-ray serve`) binds the
    same port without an error and the kernel spreads connections over both; a bind without it is refused there, as
    for any other program listening (whose port Serve's proxy fails on with a Ray traceback). Only "address in use"
    counts: any other failure (a privileged port, an address of another machine) is left to Serve, as before."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT does not count
            probe.bind((host, port))
    except OSError as err:
        return err.errno == errno.EADDRINUSE
    return False


def refuse_a_port_in_use(host: str, port: int) -> None:
    """A ValueError naming ``host:port`` when another program listens there (``port_in_use``)."""
    if port_in_use(host, port):
        raise ValueError(f"port {port} on {host} is already in use by another program, perhaps another `zephyr-ray "
                         "serve` or `serve run` with a Ray of its own (Serve would share the port with another Serve "
                         "and split the requests between them): stop it, or serve with another --port")


def serve_locally(config: ServeConfig, hardware: Hardware, host: str = "127.0.0.1", port: int = 8000,
                  run_dir: Path | None = None) -> str:
    """Deploy the app on the Ray this process is connected to, HTTP on ``host:port``; returns the base URL once
    every replica is up. Serve has one HTTP address per cluster and ignores another one asked for later (with a
    warning in the log), so on a cluster where Serve already listens elsewhere the app would answer there and the
    URL printed would be refused: that is an error naming the address Serve has. So is an app of this name already
    there (another ``zephyr-ray serve``): deploying would replace it. Where Serve is not running yet, a port that
    another program on this machine listens on is an error too (``port_in_use``)."""
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client

    serve_is_running = _get_global_client(raise_if_no_controller_running=False) is not None
    if not serve_is_running and ray.util.get_node_ip_address() in {
            node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]}:  # this machine's proxy binds it
        refuse_a_port_in_use(host, port)
    serve.start(http_options={"host": host, "port": port})
    running = _get_global_client().http_config
    host_served = running.host in (host, "0.0.0.0", "::")  # every interface (IPv4, IPv6) serves this one too
    if running.port != port or not host_served:
        raise ValueError(f"Ray Serve already runs on this cluster with HTTP on {running.host}:{running.port}, and "
                         f"Serve keeps one address per cluster: serve with --port {running.port}"
                         f"{'' if host_served else f' --host {running.host}'}, or on a cluster "
                         "of its own (`serve shutdown` stops Serve and every app on it)")
    if APP_NAME in serve.status().applications:  # serve.run would replace it, under the other CLI's feet
        raise ValueError(f"Serve on this cluster already has an app named '{APP_NAME}' (another `zephyr-ray serve`, "
                         "or one that was killed): stop that one with Ctrl-C, or run `serve shutdown`, which stops "
                         "Serve and every app on it")
    serve.run(build_app(config, hardware, run_dir), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def curl_example(url: str, model_id: str, api_key_env: str | None) -> str:
    auth = f' -H "Authorization: Bearer ${api_key_env}"' if api_key_env else ""
    return (f"curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} "
            f"-d '{{\"model\": \"{model_id}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'")
