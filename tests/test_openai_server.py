"""The OpenAI-compatible server, driven by the real ``openai`` client on a random loopback port."""

from __future__ import annotations

import json
import re
import threading
import time

import httpx
import openai
import pytest
from openai import OpenAI

from maskkv_engine import LLM, SamplingParams
from maskkv_engine.engine.async_llm_engine import AsyncLLMEngine
from maskkv_engine.entrypoints.openai.api_server import build_app
from maskkv_engine.entrypoints.openai.protocol import ENGINE_FIELDS
from tests.conftest import prompt_ids
from tests.server_utils import ServerThread

API_KEY = "sk-test-key"
MODEL = "tiny-llada"


@pytest.fixture(scope="module")
def server(llada_dir):
    engine = AsyncLLMEngine.from_engine_args(str(llada_dir), kv_policy="full", max_num_seqs=16, max_queue_len=64)
    with ServerThread(build_app(engine, [MODEL], api_key=API_KEY, max_body_bytes=1 << 20)) as s:
        s.engine = engine
        yield s


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def llm(llada_dir):
    return LLM(str(llada_dir), kv_policy="full")


def pages(http) -> dict[str, float]:
    text = http.get("/metrics").text
    return {
        name: float(re.search(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M).group(1))
        for name in ("maskkv_kv_pages_used", "maskkv_kv_pages_reserved", "maskkv_kv_pages_free")
    }


def wait_idle(server, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while server.engine.num_running or server.engine.num_waiting:
        assert time.monotonic() < deadline, "the engine did not drain"
        time.sleep(0.01)


# ---- routes -----------------------------------------------------------------------------------------
def test_models_health_metrics(client, http):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert http.get("/health").status_code == 200
    metrics = http.get("/metrics")
    assert metrics.status_code == 200
    for name in ("maskkv_num_requests_running", "maskkv_num_requests_waiting", "maskkv_kv_pages_used",
                 "maskkv_kv_pages_free", "maskkv_kv_bytes_used", "maskkv_step_latency_seconds_bucket",
                 "maskkv_request_tokens_per_second_bucket"):  # fmt: skip
        assert name in metrics.text


def test_completion_matches_offline_llm(client, llm):
    sp = SamplingParams(gen_length=16, steps=16, block_length=8, temperature=1.0, seed=3)
    expected = llm.generate("w1 w2 w3 w4", sp, use_tqdm=False)[0]
    resp = client.completions.create(
        model=MODEL,
        prompt="w1 w2 w3 w4",
        max_tokens=16,
        temperature=1.0,
        seed=3,
        extra_body={"steps": 16, "block_length": 8},
    )
    assert resp.choices[0].text == expected.outputs[0].text
    assert resp.choices[0].finish_reason == expected.outputs[0].finish_reason
    assert resp.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert resp.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert resp.id.startswith("cmpl-") and resp.model == MODEL


def test_token_id_and_batched_prompts(client, llm):
    prompts = [prompt_ids(6, seed=1), prompt_ids(11, seed=2)]
    sp = SamplingParams(gen_length=8, steps=8)
    expected = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    resp = client.completions.create(model=MODEL, prompt=prompts, max_tokens=8, extra_body={"steps": 8})
    assert [c.index for c in resp.choices] == [0, 1]
    assert [c.text for c in resp.choices] == [e.outputs[0].text for e in expected]


STREAM_CASES = [
    dict(temperature=0.0, extra_body={"steps": 16}),
    dict(temperature=1.0, seed=11, extra_body={"steps": 16, "block_length": 4}),
    dict(temperature=1.0, seed=12, extra_body={"steps": 8, "remasking": "random", "ignore_eos": True}),
    dict(temperature=0.0, extra_body={"threshold": 0.5, "block_length": 8}),
]


@pytest.mark.parametrize("case", STREAM_CASES)
@pytest.mark.parametrize("prompt", ["w5 w6 w7", "w9 w10 w11 w12 w13 w14 w15 w16"])
def test_streamed_text_joins_to_the_non_streamed_text(client, case, prompt):
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, **case)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, stream=True, **case))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_include_denoising_shows_every_step_with_masks(client, llm):
    sp = SamplingParams(gen_length=16, steps=16, block_length=8, stop_at_eos=False)
    expected = llm.generate("w3 w4", sp, use_tqdm=False)[0].outputs[0].text
    stream = client.completions.create(
        model=MODEL, prompt="w3 w4", max_tokens=16, stream=True,
        stream_options={"include_denoising": True}, extra_body={"steps": 16, "block_length": 8, "ignore_eos": True},
    )  # fmt: skip
    chunks = list(stream)
    steps = [c.choices[0].model_extra["denoising"] for c in chunks[:-1]]
    assert [s["step"] for s in steps] == list(range(1, 16))  # one chunk per step, the last one is final
    assert steps[0]["canvas"].count("[MASK]") == 15 == steps[0]["num_masked"]
    assert [s["num_masked"] for s in steps] == list(range(15, 0, -1))
    assert "".join(c.choices[0].text for c in chunks) == expected
    # the settled text shown so far is always a prefix of the canvas
    shown = ""
    for chunk, s in zip(chunks, steps):
        shown += chunk.choices[0].text
        assert s["canvas"].startswith(shown)


def test_chat_completion_and_stream(client, llm):
    messages = [{"role": "user", "content": "w3 w4 w5"}]
    sp = SamplingParams(gen_length=12, steps=12, temperature=1.0, seed=9)
    expected = llm.chat(messages, sp, use_tqdm=False)[0]
    kw = dict(model=MODEL, messages=messages, max_tokens=12, temperature=1.0, seed=9)
    resp = client.chat.completions.create(**kw)
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == expected.outputs[0].text
    assert resp.usage.prompt_tokens == len(expected.prompt_token_ids)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.outputs[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected.outputs[0].token_ids)
    den = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_denoising": True}))
    assert "[MASK]" in den[1].choices[0].model_extra["denoising"]["canvas"]
    assert "".join(c.choices[0].delta.content or "" for c in den) == expected.outputs[0].text


def test_auth_is_required_on_v1_routes(server):
    for key in ("wrong-key", ""):
        bad = OpenAI(base_url=server.url + "/v1", api_key=key or "x", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=MODEL, prompt="w1", max_tokens=4)
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "w1"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health").status_code == 200  # probes need no key


# ---- errors -----------------------------------------------------------------------------------------
NEEDS_NO_N = pytest.mark.skipif("n" in ENGINE_FIELDS, reason="the engine samples n > 1")
GOOD = {"model": MODEL, "prompt": "w1 w2", "max_tokens": 4}

ERROR_CASES = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (b'{"model": "tiny-llada", "prompt": "w1", "temperature": NaN}', 400, None),
    (b"\xff\xfe", 400, None),
    ({**GOOD, "max_tokens": "8"}, 400, "max_tokens"),
    ({**GOOD, "max_tokens": -1}, 400, "max_tokens"),
    ({**GOOD, "max_tokens": 0}, 400, "max_tokens"),
    ({**GOOD, "max_tokens": 10**12}, 400, "max_tokens"),
    ({**GOOD, "temperature": "hot"}, 400, "temperature"),
    ({**GOOD, "temperature": -1}, 400, "temperature"),
    ({**GOOD, "prompt": 5}, 400, "prompt"),
    ({**GOOD, "prompt": ""}, 400, None),
    ({**GOOD, "prompt": []}, 400, "prompt"),
    ({**GOOD, "prompt": [5] * 5000}, 400, "prompt"),
    ({**GOOD, "prompt": [255]}, 400, "prompt"),  # the mask token
    ({**GOOD, "prompt": [100000]}, 400, "prompt"),
    ({**GOOD, "remasking": "sideways"}, 400, "remasking"),
    ({**GOOD, "block_length": 3}, 400, "block_length"),
    ({**GOOD, "steps": 10**9}, 400, "steps"),
    ({**GOOD, "seed": -1}, 400, "seed"),
    pytest.param({**GOOD, "n": 2}, 400, "n", marks=NEEDS_NO_N),
    ({**GOOD, "n": 0}, 400, "n"),
    ({**GOOD, "echo": True}, 400, "echo"),
    ({**GOOD, "presence_penalty": 0.5}, 400, "presence_penalty"),
    ({**GOOD, "stream": "yes"}, 400, "stream"),
    ({**GOOD, "stream_options": {"include_denoising": 1}}, 400, None),
    ({**GOOD, "no_such_field": 1}, 400, "no_such_field"),
    ({**GOOD, "model": 5}, 400, "model"),
    ({**GOOD, "model": "gpt-4"}, 404, "model"),
]


@pytest.mark.parametrize("body,status,param", ERROR_CASES)
def test_bad_requests_get_openai_errors(http, body, status, param):
    if isinstance(body, bytes):
        r = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param is not None:
        assert err["param"].split(".")[0] == param, err


def finished_requests(http) -> float:
    return sum(
        float(v) for v in re.findall(r"^maskkv_request_success_total\{[^}]*\} (\S+)$", http.get("/metrics").text, re.M)
    )


def test_a_bad_prompt_in_a_batch_refuses_the_whole_batch(server, http):
    wait_idle(server)
    before = finished_requests(http)
    r = http.post("/v1/completions", json={**GOOD, "prompt": [[5, 6], [5] * 5000, [7]], "max_tokens": 256})
    assert r.status_code == 400 and "max_model_len" in r.json()["error"]["message"]
    wait_idle(server)
    assert pages(http)["maskkv_kv_pages_used"] == 0 and pages(http)["maskkv_kv_pages_reserved"] == 0
    assert finished_requests(http) == before  # the good prompts were aborted, not run


def test_chat_errors(http):
    base = {"model": MODEL, "max_tokens": 4}
    for body in ({**base, "messages": []}, {**base, "messages": [{"role": "wizard", "content": "w1"}]},
                 {**base, "messages": "w1"}, {**base, "messages": [{"role": "user", "content": 3}]}):  # fmt: skip
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and "error" in r.json(), r.text


def test_oversized_body_and_unknown_route(http):
    r = http.post("/v1/completions", json={**GOOD, "prompt": "w1 " * 400_000})
    assert r.status_code == 413 and "error" in r.json()
    r = http.post("/v1/completions", content=b"x" * (2 << 20), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    r = http.get("/v1/no-such-route")
    assert r.status_code == 404 and "error" in r.json()
    r = http.get("/v1/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_openai_client_sees_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="w1", max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="max_model_len"):
        client.completions.create(model=MODEL, prompt=[5] * 5000, max_tokens=4)
    assert client.completions.create(model=MODEL, prompt="w1", max_tokens=4).choices[0].finish_reason


# ---- disconnects --------------------------------------------------------------------------------------
def test_disconnect_mid_stream_frees_pages_and_spares_the_others(server, client, llm):
    wait_idle(server)
    bm = server.engine.engine.block_manager
    sp = dict(max_tokens=96, temperature=1.0, extra_body={"steps": 96, "ignore_eos": True})
    prompts = {"a": "w1 w2 w3 w4 w5", "b": "w7 w8", "c": "w20 w21 w22 w23"}
    results: dict[str, str] = {}

    def run(name: str) -> None:
        chunks = client.completions.create(model=MODEL, prompt=prompts[name], seed=ord(name), stream=True, **sp)
        results[name] = "".join(c.choices[0].text for c in chunks)

    others = [threading.Thread(target=run, args=(n,)) for n in ("b", "c")]
    for t in others:
        t.start()
    victim = client.completions.create(model=MODEL, prompt=prompts["a"], seed=ord("a"), stream=True,
                                       stream_options={"include_denoising": True}, **sp)  # fmt: skip
    first = next(iter(victim))
    rid = next(r for r in list(server.engine._streams) if r.startswith(first.id))
    for _, _ in zip(range(3), victim):
        pass
    assert bm.request_pages(rid) > 0
    victim.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 10
    while bm.has_request(rid):
        assert time.monotonic() < deadline, "the aborted request still holds pages"
        time.sleep(0.005)
    assert any(t.is_alive() for t in others)  # freed while the others were still streaming
    for t in others:
        t.join(timeout=60)
    for name in ("b", "c"):  # the others are unharmed: same text as an undisturbed run
        exp = llm.generate(prompts[name], SamplingParams(gen_length=96, steps=96, temperature=1.0, seed=ord(name),
                                                         stop_at_eos=False), use_tqdm=False)  # fmt: skip
        assert results[name] == exp[0].outputs[0].text
    wait_idle(server)
    assert pages(httpx.Client(base_url=server.url)) == {
        "maskkv_kv_pages_used": 0, "maskkv_kv_pages_reserved": 0, "maskkv_kv_pages_free": bm.num_pages,
    }  # fmt: skip


def test_non_streaming_client_timeout_aborts(server):
    wait_idle(server)
    impatient = OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        impatient.completions.create(model=MODEL, prompt="w1 w2", max_tokens=1024, extra_body={"steps": 1024})
    wait_idle(server, timeout=10)  # aborted, not run to the end (1024 steps take far longer)
    assert server.engine.engine.block_manager.num_used_pages == 0


# ---- queue limit --------------------------------------------------------------------------------------
def test_full_queue_gets_503_with_retry_after(llada_dir):
    engine = AsyncLLMEngine.from_engine_args(str(llada_dir), kv_policy="full", max_num_seqs=1, max_queue_len=1)
    with ServerThread(build_app(engine, [MODEL])) as s, httpx.Client(base_url=s.url, timeout=60) as http:
        long = {"model": MODEL, "prompt": "w1", "max_tokens": 1024, "steps": 1024, "stream": True,
                "stream_options": {"include_denoising": True}}  # fmt: skip
        replies: list[httpx.Response] = []
        with http.stream("POST", "/v1/completions", json=long) as running:
            assert running.status_code == 200
            next(running.iter_lines())  # a denoising chunk: the long request runs, the batch (1) is full
            waiting = threading.Thread(target=lambda: replies.append(http.post("/v1/completions", json=GOOD)))
            waiting.start()
            deadline = time.monotonic() + 30
            while engine.num_waiting < 1:
                assert time.monotonic() < deadline and waiting.is_alive(), replies
                time.sleep(0.005)
            r = http.post("/v1/completions", json=GOOD)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
        waiting.join(timeout=30)  # closing the long stream aborted it, so the waiting one ran
        assert not waiting.is_alive() and replies[0].status_code == 200
        assert http.post("/v1/completions", json=GOOD).status_code == 200
        assert json.loads(http.get("/v1/models").text)["data"][0]["id"] == MODEL
