"""Server edges and local-server safety: non-finite numbers, refresh_config checks, queue and compute
limits, Content-Type and Host checks, the model path never shown, and a failed engine step."""

from __future__ import annotations

import argparse
import json
import threading
import time

import httpx
import pytest

from maskkv_engine.config import EngineConfig
from maskkv_engine.engine.async_llm_engine import AsyncLLMEngine
from maskkv_engine.engine.input_processor import REFRESH_CACHE_SIZE
from maskkv_engine.engine.llm_engine import LLMEngine
from maskkv_engine.entrypoints.openai.api_server import build_app
from maskkv_engine.entrypoints.openai.cli_args import resolve_model
from maskkv_engine.outputs import CompletionOutput, RequestOutput
from maskkv_engine.sampling_params import SamplingParams
from tests.server_utils import ServerThread

MODEL = "tiny-llada"
GOOD = {"model": MODEL, "prompt": "w1 w2", "max_tokens": 8}
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(llada_dir):
    engine = AsyncLLMEngine.from_engine_args(str(llada_dir), kv_policy="full", max_num_seqs=4, max_queue_len=3)
    app = build_app(engine, [MODEL], max_tokens_limit=32, allowed_hosts=["good.example"],
                    model_aliases=[str(llada_dir)])  # fmt: skip
    with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=60) as http:
        s.engine, s.http = engine, http
        yield s


def post(server, body, route="/v1/completions", **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return server.http.post(route, content=content, headers=kw.pop("headers", JSON), **kw)


def assert_error(r: httpx.Response, status: int, param: str | None = None, text: str = "") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    assert text in err["message"], err
    return err


# ---- numbers and refresh_config -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw,param",
    [
        (b'{"model": "tiny-llada", "prompt": "w1", "max_tokens": 4, "temperature": 1e999}', "temperature"),
        (b'{"model": "tiny-llada", "prompt": "w1", "max_tokens": 4, "top_p": -1e400}', "top_p"),
        (b'{"model": "tiny-llada", "prompt": [5, 6, 1e999]}', "prompt.2"),
        (b'{"model": "tiny-llada", "prompt": "w1", "refresh": "elastic", "refresh_config": {"gamma": 1e999}}',
         "refresh_config.gamma"),
    ],
)  # fmt: skip
def test_numbers_that_overflow_to_infinity_are_400(server, raw, param):
    assert_error(post(server, raw), 400, param, "not a finite number")


REFRESH_CASES = [
    ({"refresh": "dllm_cache", "refresh_config": {"K_r": True}}, "refresh_config.K_r"),
    ({"refresh": "dllm_cache", "refresh_config": {"K_r": 2.5}}, "refresh_config.K_r"),
    ({"refresh": "dllm_cache", "refresh_config": {"K_r": 0}}, "refresh_config.K_r"),
    ({"refresh": "dllm_cache", "refresh_config": {"K_p": 10**30}}, "refresh_config.K_p"),
    ({"refresh": "dllm_cache", "refresh_config": {"rho": 2}}, "refresh_config.rho"),
    ({"refresh": "dllm_cache", "refresh_config": {"rho": "all"}}, "refresh_config.rho"),
    ({"refresh": "elastic", "refresh_config": {"block_caching": "no"}}, "refresh_config.block_caching"),
    ({"refresh": "elastic", "refresh_config": {"window": 10**30}}, "refresh_config.window"),
    ({"refresh": "elastic", "refresh_config": {"window": "row"}}, "refresh_config.window"),
    ({"refresh": "elastic", "refresh_config": {"window": [16]}}, "refresh_config.window"),
    ({"refresh": "elastic", "refresh_config": {"track_num": -1}}, "refresh_config.track_num"),
    ({"refresh": "elastic", "refresh_config": {"gamma": None}}, "refresh_config.gamma"),
    ({"refresh": "fast_dllm", "refresh_config": {"K_r": 3}}, "refresh_config.K_r"),
    ({"refresh_config": {"K_r": 3}}, "refresh_config.K_r"),  # the engine's default strategy has no K_r
    ({"refresh": "sideways"}, "refresh"),
]


@pytest.mark.parametrize("fields,param", REFRESH_CASES)
def test_bad_refresh_config_values_are_400_naming_the_field(server, fields, param):
    assert_error(post(server, {**GOOD, **fields}), 400, param)


@pytest.mark.parametrize(
    "fields",
    [
        {"refresh": "dllm_cache", "refresh_config": {"K_r": 3, "K_p": 5, "rho": 0.5}},
        {"refresh": "elastic", "refresh_config": {"window": "block", "gamma": 0.8, "block_caching": False}},
        {"refresh": "elastic", "refresh_config": {"gamma": 1}},  # an int where a float is expected
        {"refresh": "fast_dllm_dual", "refresh_config": {}},
    ],
)
def test_good_refresh_configs_still_run(server, fields):
    r = post(server, {**GOOD, **fields})
    assert r.status_code == 200, r.text


def test_refresh_strategy_cache_is_bounded(llada_dir):
    """Every distinct refresh_config used to stay cached forever: 20,000 K_r values, 20,000 entries."""
    engine = LLMEngine(EngineConfig.from_kwargs(str(llada_dir), kv_policy="full"))
    for k in range(1, 3 * REFRESH_CACHE_SIZE):
        params = SamplingParams(gen_length=4, refresh="dllm_cache", refresh_config={"K_r": k})
        engine.add_request(f"r{k}", [5, 6, 7], params)
        engine.abort_request(f"r{k}")
        assert len(engine.input_processor._refresh_by_config) <= REFRESH_CACHE_SIZE
    # the most recent configs are the ones kept
    assert ("dllm_cache", (("K_r", repr(3 * REFRESH_CACHE_SIZE - 1)),)) in engine.input_processor._refresh_by_config


# ---- queue and compute limits -------------------------------------------------------------------------
def test_a_batch_larger_than_the_queue_is_400_not_503(server):
    err = assert_error(post(server, {**GOOD, "prompt": ["w1", "w2", "w3", "w4"]}), 400, "prompt")
    assert "--max-queue-len 3" in err["message"]
    assert post(server, {**GOOD, "prompt": ["w1", "w2", "w3"]}).status_code == 200


def test_max_tokens_limit(server):
    assert_error(post(server, {**GOOD, "max_tokens": 33}), 400, "max_tokens", "--max-tokens-limit")
    assert_error(post(server, {**GOOD, "prompt": ["w1", "w2"], "max_tokens": 17}), 400, "max_tokens", "x 2 prompts")
    assert_error(post(server, {**GOOD, "steps": 33}), 400, "steps", "[1, 32]")
    assert post(server, {**GOOD, "prompt": ["w1", "w2"], "max_tokens": 16, "steps": 16}).status_code == 200
    # chat's default canvas is cut to the limit instead of refused
    r = post(server, {"model": MODEL, "messages": [{"role": "user", "content": "w1"}]}, "/v1/chat/completions")
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 32


# ---- local-server safety ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data", "text/json"]
)
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_post_routes_need_a_json_content_type(server, content_type, route):
    headers = {} if content_type is None else {"Content-Type": content_type}
    r = server.http.post(route, content=json.dumps(GOOD).encode(), headers=headers)
    assert_error(r, 415, "Content-Type", "application/json")


def test_json_content_type_with_parameters_is_accepted(server):
    r = post(server, GOOD, headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.1.evil.example", "10.0.0.1", ""])
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/models", "/metrics", "/health"])
def test_foreign_host_headers_are_refused(server, host, route):
    method = server.http.post if route == "/v1/completions" else server.http.get
    kw = {"content": json.dumps(GOOD).encode()} if route == "/v1/completions" else {}
    r = method(route, headers={"Host": host, **JSON}, **kw)
    assert_error(r, 400, "Host", "--allowed-hosts")


@pytest.mark.parametrize(
    "host", ["localhost", "LOCALHOST:8000", "127.0.0.1", "[::1]:1234", "good.example", "good.example."]
)
def test_local_and_allowed_host_headers_are_served(server, host):
    assert server.http.get("/v1/models", headers={"Host": host}).status_code == 200


def test_host_check_on_a_wildcard_address_and_star(llada_dir):
    engine = AsyncLLMEngine.from_engine_args(str(llada_dir), kv_policy="full")
    app = build_app(engine, [MODEL], allowed_hosts=[], bound_host="0.0.0.0")
    with ServerThread(app) as s, httpx.Client(base_url=s.url, timeout=60) as http:
        assert http.get("/v1/models", headers={"Host": "192.168.1.7:8000"}).status_code == 200  # by IP: fine
        assert http.get("/v1/models", headers={"Host": "[fe80::1]"}).status_code == 200
        assert http.get("/v1/models", headers={"Host": "rebound.example"}).status_code == 400
    engine = AsyncLLMEngine.from_engine_args(str(llada_dir), kv_policy="full")
    with ServerThread(build_app(engine, [MODEL], allowed_hosts=["*"])) as s, httpx.Client(base_url=s.url) as http:
        assert http.get("/v1/models", headers={"Host": "anything.example"}).status_code == 200


def test_the_model_path_is_never_shown(server, llada_dir):
    path = str(llada_dir)
    assert path not in server.http.get("/v1/models").text
    assert path not in server.http.get("/metrics").text
    r = post(server, {**GOOD, "model": path})  # the path is still accepted as the id
    assert r.status_code == 200 and r.json()["model"] == MODEL
    args = argparse.Namespace(model=path + "/", served_model_name=None)
    assert resolve_model(args) == (path + "/", llada_dir.name)
    assert resolve_model(argparse.Namespace(model=path, served_model_name="x"))[1] == "x"
    assert resolve_model(argparse.Namespace(model=None, served_model_name=None))[1] == "maskkv-default"


def test_serve_flags():
    from maskkv_engine.entrypoints.cli import build_parser

    args = build_parser().parse_args(["serve", "--allowed-hosts", "a.example,b.example", "--max-tokens-limit", "64"])
    assert args.allowed_hosts == ["a.example", "b.example"] and args.max_tokens_limit == 64
    args = build_parser().parse_args(["serve"])
    assert args.allowed_hosts == [] and args.max_tokens_limit is None  # loopback names only; max_model_len


# ---- a failed engine step -----------------------------------------------------------------------------
POISON = [9, 9, 9, 9, 9, 9, 9]  # the prompt whose steps fail


@pytest.fixture()
def failing_server(llada_dir):
    engine = AsyncLLMEngine.from_engine_args(str(llada_dir), kv_policy="full", max_num_seqs=8)
    with ServerThread(build_app(engine, [MODEL])) as s, httpx.Client(base_url=s.url, timeout=60) as http:
        s.engine, s.http = engine, http
        yield s


def test_a_step_that_raises_fails_its_request_and_the_server_goes_on(failing_server, monkeypatch):
    server = failing_server
    runner = server.engine.engine.runner
    execute = runner.execute

    def failing_execute(scheduled):
        if any(item.request.prompt_token_ids == POISON for item in scheduled):
            raise RuntimeError("injected kernel failure")
        return execute(scheduled)

    monkeypatch.setattr(runner, "execute", failing_execute)
    err = assert_error(post(server, {**GOOD, "prompt": POISON}), 500, text="injected kernel failure")
    assert err["type"] == "server_error" and err["code"] == "engine_error"
    r = post(server, {**GOOD, "prompt": POISON, "stream": True})
    assert r.status_code == 200
    events = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "engine_error"
    assert post(server, GOOD).status_code == 200  # the next request is served
    bm = server.engine.engine.block_manager
    assert bm.num_used_pages == 0 and bm.num_reserved_pages == 0
    assert server.http.get("/health").status_code == 200


def test_an_error_output_fails_only_its_request(failing_server, monkeypatch):
    """The engine finishes the requests of a failed step with finish_reason 'error' and ``error`` set:
    that request gets a 500 (or an error event), a concurrent one in the same batch is unharmed."""
    server = failing_server
    engine = server.engine.engine
    step = engine.step

    def step_failing_the_poisoned(intermediate: bool = False):
        victim = next((r for r in engine.scheduler.running if r.prompt_token_ids == POISON), None)
        if victim is None:
            return step(intermediate)
        engine.abort_request(victim.request_id)
        failed = RequestOutput(victim.request_id, None, POISON, [CompletionOutput(0, "", [], "error")], True,
                               victim.metrics, error="CUDA error: an illegal memory access")  # fmt: skip
        return [*step(intermediate), failed]

    monkeypatch.setattr(engine, "step", step_failing_the_poisoned)
    long = {**GOOD, "prompt": "w3 w4", "max_tokens": 64, "steps": 64, "ignore_eos": True}
    replies: dict[str, httpx.Response] = {}
    other = threading.Thread(target=lambda: replies.setdefault("other", post(server, long)))
    other.start()
    deadline = time.monotonic() + 30
    while not server.engine.num_running:  # the long request runs before the poisoned one arrives
        assert time.monotonic() < deadline
        time.sleep(0.005)
    err = assert_error(post(server, {**GOOD, "prompt": POISON}), 500, text="illegal memory access")
    assert err["code"] == "engine_error"
    r = post(server, {"model": MODEL, "messages": [{"role": "user", "content": "w1"}], "stream": True,
                      "max_tokens": 8}, "/v1/chat/completions")  # fmt: skip
    assert r.status_code == 200 and "error" not in r.text  # not poisoned: a chat prompt is templated
    r = post(server, {**GOOD, "prompt": POISON, "stream": True})
    assert '"engine_error"' in r.text and r.text.rstrip().endswith("data: [DONE]")
    other.join(timeout=60)
    assert replies["other"].status_code == 200, replies["other"].text
    assert replies["other"].json()["usage"]["completion_tokens"] == 64
    assert server.http.get("/health").status_code == 200
