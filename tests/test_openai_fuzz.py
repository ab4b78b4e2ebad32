"""Hundreds of random and malformed bodies, Content-Types and Host headers: every answer is a 200 or a
4xx OpenAI JSON error, never a 5xx, and the server still serves a good request afterwards."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from maskkv_engine.engine.async_llm_engine import AsyncLLMEngine
from maskkv_engine.entrypoints.openai.api_server import build_app
from tests.server_utils import ServerThread

MODEL = "fuzz-llada"
MAX_MODEL_LEN = 48  # keeps any body that happens to be valid cheap to serve
MAX_TOKENS_LIMIT = 24
OVERFLOW = 1.2345e300  # written into the body as 1e999, which JSON parsers read as infinity


@pytest.fixture(scope="module")
def http(llada_dir):
    engine = AsyncLLMEngine.from_engine_args(
        str(llada_dir), kv_policy="full", max_model_len=MAX_MODEL_LEN, max_num_seqs=8, max_queue_len=16
    )
    app = build_app(engine, [MODEL], max_body_bytes=64 << 10, max_tokens_limit=MAX_TOKENS_LIMIT, allowed_hosts=[])
    with ServerThread(app) as s:
        with httpx.Client(base_url=s.url, timeout=60) as client:
            client.engine = engine
            yield client


scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.integers(-3, 70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.just(OVERFLOW)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip
words = st.lists(st.sampled_from(["w1", "w2", "w3", "w40", "<|user|>", "hello", ""]), max_size=8).map(" ".join)
prompts = words | st.lists(st.integers(-5, 300), max_size=8) | st.lists(words, max_size=3) | json_values
messages = (
    st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["user", "assistant", "system", "tool", "x"]) | json_values,
                "content": words | json_values,
            }
        ),
        max_size=3,
    )
    | json_values
)
small_ints = st.integers(-2, 64) | json_values
FIELDS = {
    "max_tokens": small_ints,
    "max_completion_tokens": small_ints,
    "steps": small_ints,
    "block_length": small_ints,
    "remasking": st.sampled_from(["low_confidence", "random", "entropy", "origin", "?"]) | json_values,
    "kv_budget": small_ints,
    "threshold": st.floats(-1, 2) | json_values,
    "factor": st.floats(-1, 4) | json_values,
    "cfg_scale": st.floats(-1, 2) | json_values,
    "temperature": st.floats(-1, 3) | json_values,
    "top_p": st.floats(-1, 2) | json_values,
    "top_k": small_ints,
    "alg_temp": st.floats(-1, 2) | json_values,
    "seed": st.integers(-5, 2**64) | json_values,
    "n": small_ints,
    "stream": st.booleans() | json_values,
    "stream_options": st.fixed_dictionaries(
        {}, optional={"include_usage": st.booleans(), "include_denoising": st.booleans()}
    )
    | json_values,
    "ignore_eos": st.booleans() | json_values,
    "refresh": st.sampled_from(["every_step", "fast_dllm", "fast_dllm_dual", "dllm_cache", "elastic", "?"])
    | json_values,
    "refresh_config": st.dictionaries(
        st.sampled_from(["K_p", "K_r", "rho", "gamma", "window", "track_num", "block_caching", "early_stop", "x"]),
        st.integers(-2, 40) | st.floats(-1, 2) | st.booleans() | st.just("block") | st.just(2**40) | json_values,
        max_size=3,
    )
    | json_values,
    "stop": json_values,
    "stop_token_ids": st.lists(st.integers(-2, 300), max_size=3) | json_values,
    "logprobs": st.booleans() | st.integers(-1, 25) | json_values,
    "top_logprobs": st.integers(-1, 25) | json_values,
    "echo": json_values,
    "user": json_values,
    "tools": st.sampled_from([[], [{"type": "function", "function": {"name": "f"}}]]) | json_values,
    "tool_choice": st.sampled_from(["none", "auto", "required", {"type": "function"}]) | json_values,
    "parallel_tool_calls": st.booleans() | json_values,
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}, {}]) | json_values,
}
valid_fields = st.fixed_dictionaries(
    {},
    optional={
        "max_tokens": st.integers(1, 16),
        "steps": st.integers(1, 16),
        "block_length": st.sampled_from([1, 2, 4, 8, 16]),
        "temperature": st.floats(0, 2),
        "seed": st.integers(0, 2**63 - 1),
        "remasking": st.sampled_from(["low_confidence", "random"]),
        "threshold": st.floats(0.01, 1.0),
        "kv_budget": st.integers(1, 40),
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries(
            {}, optional={"include_usage": st.booleans(), "include_denoising": st.booleans()}
        ),  # fmt: skip
        "ignore_eos": st.booleans(),
        "top_p": st.floats(0.01, 1.0),
        "top_k": st.integers(1, 300),
        "refresh": st.sampled_from(["every_step", "fast_dllm", "fast_dllm_dual", "dllm_cache", "elastic"]),
    },
)


@st.composite
def mostly_valid(draw) -> tuple[str, bytes]:
    """A valid request with up to three mutations: a field set to anything, a field dropped, junk added."""
    chat = draw(st.booleans())
    body: dict = {"model": MODEL}
    if chat:
        body["messages"] = [{"role": "user", "content": draw(words)}]
    else:
        body["prompt"] = draw(words | st.lists(st.integers(3, 200), min_size=1, max_size=8))
    body.update(draw(valid_fields))
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["set", "set", "drop", "junk"]))
        if kind == "set":
            name = draw(st.sampled_from(sorted(FIELDS) + ["model", "prompt", "messages"]))
            any_value = {"prompt": prompts, "messages": messages, "model": json_values}
            body[name] = draw(any_value[name] if name in any_value else FIELDS[name])
        elif kind == "drop" and body:
            del body[draw(st.sampled_from(sorted(body)))]
        else:
            body[draw(st.text(max_size=8))] = draw(json_values)
    return ("/v1/chat/completions" if chat else "/v1/completions"), encode(body)


def encode(value) -> bytes:
    return json.dumps(value).replace(json.dumps(OVERFLOW), "1e999").encode()


tokenizer_bodies = st.tuples(
    st.just("/tokenize"),
    st.fixed_dictionaries(
        {},
        optional={"model": st.just(MODEL) | json_values, "prompt": words | json_values, "messages": messages,
                  "add_special_tokens": st.booleans() | json_values, "return_token_strs": st.booleans() | json_values},
    ).map(encode),
) | st.tuples(
    st.just("/detokenize"),
    st.fixed_dictionaries({"tokens": st.lists(st.integers(-5, 300), max_size=6) | json_values},
                          optional={"model": st.just(MODEL) | json_values}).map(encode),
)  # fmt: skip

garbage = st.tuples(
    st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]),
    json_values.map(encode)
    | st.binary(max_size=128)
    | mostly_valid().map(lambda rb: rb[1][: len(rb[1]) // 2]),  # truncated JSON
)


JSON_TYPES = ["application/json", "application/json; charset=utf-8"]
content_types = st.sampled_from(JSON_TYPES * 4 + ["text/plain", "", "application/x-www-form-urlencoded",
                                                  "multipart/form-data; boundary=x", "application/jsonx"])  # fmt: skip
LOCAL_HOSTS = [None, "localhost", "127.0.0.1:1", "[::1]:80"]  # None: the client's own Host
hosts = st.sampled_from(LOCAL_HOSTS * 3 + ["evil.example", "", "localhost.evil.example", "10.0.0.1"])


def check(r: httpx.Response, content_type: str = "application/json", host: str | None = None) -> None:
    event(f"status {r.status_code}")  # --hypothesis-show-statistics: how many bodies were served
    assert r.status_code < 500, (r.status_code, r.text)
    if host not in LOCAL_HOSTS:
        assert r.status_code == 400 and r.json()["error"]["param"] == "Host", r.text
    elif content_type not in JSON_TYPES:
        assert r.status_code == 415, r.text
    if r.status_code == 200:
        if r.headers["content-type"].startswith("text/event-stream"):
            assert '"error"' not in r.text and r.text.rstrip().endswith("data: [DONE]"), r.text
        return
    assert 400 <= r.status_code < 500
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and err["type"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=mostly_valid() | garbage | tokenizer_bodies, content_type=content_types, host=hosts)
def test_random_bodies_never_get_a_500(http, request, content_type, host):
    route, body = request
    headers = {"Content-Type": content_type} if host is None else {"Content-Type": content_type, "Host": host}
    check(http.post(route, content=body, headers=headers), content_type, host)


def test_still_serves_afterwards(http):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "w1 w2", "max_tokens": 8})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    bm = http.engine.engine.block_manager
    assert bm.num_used_pages == 0 and bm.num_reserved_pages == 0
