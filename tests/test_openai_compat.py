"""What strict OpenAI clients and agent frameworks send and expect: the real ``openai`` client, and every
response and chunk checked against the ``openai`` package's own types (nothing lost, nothing mistyped)."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, fields

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionTokenLogprob
from openai.types.completion_choice import Logprobs

from maskkv_engine import __version__
from maskkv_engine.engine.async_llm_engine import AsyncLLMEngine
from maskkv_engine.entrypoints.openai import protocol
from maskkv_engine.entrypoints.openai.api_server import build_app
from maskkv_engine.entrypoints.openai.logprobs import chat_logprobs, completion_logprobs
from maskkv_engine.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from maskkv_engine.sampling_params import SamplingParams
from tests.server_utils import ServerThread

API_KEY = "sk-compat"
MODEL = "tiny-llada"
OMIT = getattr(openai, "omit", openai.NOT_GIVEN)  # leaves the field out of the body
EXTENSIONS = {"denoising", "stop_reason", "max_model_len"}  # our fields beside OpenAI's, in model_extra


@pytest.fixture(scope="module")
def server(llada_dir):
    engine = AsyncLLMEngine.from_engine_args(str(llada_dir), kv_policy="full", max_num_seqs=8)
    with ServerThread(build_app(engine, [MODEL], api_key=API_KEY, allowed_hosts=[])) as s:
        s.engine = engine
        yield s


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as c:
        yield c


def strict(model: type, data: dict):
    """Validate ``data`` as the openai type and check the round trip: every field survives with its type."""
    parsed = model.model_validate(data)
    assert parsed.model_dump(mode="json", exclude_unset=True) == data, data

    def extras(obj) -> set[str]:
        found = set(getattr(obj, "model_extra", None) or {})
        for value in vars(obj).values():
            for item in value if isinstance(value, list) else [value]:
                if hasattr(item, "model_extra"):
                    found |= extras(item)
        return found

    assert extras(parsed) <= EXTENSIONS, extras(parsed)
    return parsed


def events(r: httpx.Response) -> list[dict]:
    lines = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


# ---- the openai client -------------------------------------------------------------------------------
def test_model_may_be_omitted_when_one_model_is_served(client):
    r = client.completions.create(model=OMIT, prompt="w1 w2", max_tokens=4)
    assert r.model == MODEL and r.choices[0].finish_reason in ("stop", "length")
    c = client.chat.completions.create(model=OMIT, messages=[{"role": "user", "content": "w1"}], max_tokens=4)
    assert c.model == MODEL


def test_model_is_required_when_several_are_served(llada_dir):
    engine = AsyncLLMEngine.from_engine_args(str(llada_dir), kv_policy="full")
    with ServerThread(build_app(engine, ["a", "b"])) as s:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "w1", "max_tokens": 4})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        assert httpx.post(s.url + "/v1/completions", json={"model": "b", "prompt": "w1", "max_tokens": 4}).is_success


def test_neutral_tool_fields_are_accepted(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "w1 w2"}],
        max_tokens=4,
        tools=[],
        tool_choice="none",
        parallel_tool_calls=False,
        response_format={"type": "text"},
    )
    assert r.choices[0].message.role == "assistant"
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "w1"}], max_tokens=4,
                                       tool_choice="auto")  # fmt: skip
    assert r.choices[0].finish_reason in ("stop", "length")


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"tools": [TOOL]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
    ],
)
def test_real_tool_use_is_a_400_that_says_so(client, fields, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "w1"}], max_tokens=4,
                                       **fields)  # fmt: skip
    assert e.value.param == param
    assert "not supported" in e.value.message


def test_models_retrieve(client, http):
    m = client.models.retrieve(MODEL)
    assert m.id == MODEL and m.object == "model"
    strict(Model, http.get(f"/v1/models/{MODEL}").json())
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_errors_name_the_field_in_param(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="w1", max_tokens=4, extra_body={"block_length": 3})
    assert e.value.param == "block_length" and "Value error" not in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="w1", max_tokens=4, presence_penalty=1.0)
    assert e.value.param == "presence_penalty"


# ---- response shapes, strictly ---------------------------------------------------------------------------
BODY = {"model": MODEL, "prompt": "w1 w2 w3", "max_tokens": 8, "temperature": 1.0, "seed": 5}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "w4 w5"}], "max_tokens": 8}


def test_completion_shape(http):
    data = http.post("/v1/completions", json=BODY).json()
    strict(Completion, data)
    assert data["system_fingerprint"] == f"fp_maskkv-{__version__}-full"
    assert data["choices"][0]["logprobs"] is None and "denoising" not in data["choices"][0]


def test_chat_completion_shape(http):
    data = http.post("/v1/chat/completions", json=CHAT).json()
    strict(ChatCompletion, data)
    assert data["choices"][0]["logprobs"] is None and data["system_fingerprint"]


@pytest.mark.parametrize("options", [None, {"include_usage": True}, {"include_denoising": True}])
def test_completion_chunk_shapes(http, options):
    body = {**BODY, "max_tokens": 16, "stream": True, **({"stream_options": options} if options else {})}
    chunks = events(http.post("/v1/completions", json=body))
    with_choices = [c for c in chunks if c["choices"]]
    assert with_choices[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    for chunk in with_choices[:-1]:  # OpenAI sends finish_reason: null until the last chunk
        choice = chunk["choices"][0]
        assert "finish_reason" in choice and choice["finish_reason"] is None and choice["logprobs"] is None
        # Completion's finish_reason is not Optional; everything else must parse as it is
        strict(Completion, {**chunk, "choices": [{**choice, "finish_reason": "length"}]})
    strict(Completion, with_choices[-1])
    if options and options.get("include_usage"):
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
        strict(Completion, chunks[-1])


@pytest.mark.parametrize("options", [None, {"include_usage": True}, {"include_denoising": True}])
def test_chat_chunk_shapes(http, options):
    body = {**CHAT, "max_tokens": 16, "stream": True, **({"stream_options": options} if options else {})}
    chunks = events(http.post("/v1/chat/completions", json=body))
    for chunk in chunks:
        strict(ChatCompletionChunk, chunk)
    with_choices = [c for c in chunks if c["choices"]]
    assert with_choices[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["choices"][0]["finish_reason"] is None for c in with_choices[:-1])
    assert with_choices[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert len({c["id"] for c in chunks}) == 1 and len({c["system_fingerprint"] for c in chunks}) == 1


# ---- vLLM's extra routes ---------------------------------------------------------------------------------
def test_tokenize_detokenize_version(server, http):
    tok = server.engine.tokenizer
    r = http.post("/tokenize", json={"prompt": "w1 w2 w3", "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode("w1 w2 w3") and r["count"] == len(r["tokens"]) and r["max_model_len"] > 0
    assert r["token_strs"] == tok.convert_ids_to_tokens(r["tokens"])
    assert http.post("/detokenize", json={"model": MODEL, "tokens": r["tokens"]}).json()["prompt"] == "w1 w2 w3"
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "w1"}]}).json()
    expected = tok.apply_chat_template([{"role": "user", "content": "w1"}], add_generation_prompt=True, tokenize=True)
    assert chat["tokens"] == list(expected if isinstance(expected, list) else expected["input_ids"])
    assert http.get("/version").json() == {"version": __version__}
    for bad in ({"tokens": [10**6]}, {"tokens": "w1"}):
        assert http.post("/detokenize", json=bad).status_code == 400
    assert (
        http.post("/tokenize", json={"prompt": "w1", "messages": [{"role": "user", "content": "w1"}]}).status_code
        == 400
    )
    assert http.post("/tokenize", json={"model": "gpt-4", "prompt": "w1"}).status_code == 404
    assert httpx.post(server.url + "/tokenize", json={"prompt": "w1"}).status_code == 401  # behind the key


# ---- metrics -----------------------------------------------------------------------------------------------
def metric(http, name: str) -> float:
    m = re.search(rf"^{name}\{{[^}}]*\}} (\S+)$", http.get("/metrics").text, re.M)
    return float(m.group(1))


def test_abort_counter_and_queue_time(http):
    aborted, queued = (
        metric(http, "maskkv_request_abort_total"),
        metric(http, "maskkv_request_queue_time_seconds_count"),
    )
    body = {**BODY, "max_tokens": 256, "steps": 256, "stream": True, "stream_options": {"include_denoising": True}}
    with http.stream("POST", "/v1/completions", json=body) as r:
        next(r.iter_lines())  # it runs; then the client goes away
    deadline = time.monotonic() + 10
    while metric(http, "maskkv_request_abort_total") < aborted + 1:
        assert time.monotonic() < deadline, "the abort was not counted"
        time.sleep(0.01)
    assert metric(http, "maskkv_request_queue_time_seconds_count") >= queued + 1  # counted though it never finished


# ---- n / stop / logprobs: mapped onto the engine's names where it has them ----------------------------------
@dataclass
class VLLMStyleParams(SamplingParams):
    """SamplingParams as the engine will have it once it takes vLLM's names."""

    n: int = 1
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    logprobs: int | None = None


def test_openai_fields_map_onto_the_engine_names():
    body = {"prompt": "w1", "n": 3, "stop": "w5", "stop_token_ids": [7], "logprobs": 2}
    request = CompletionRequest.model_validate(body)
    request.check_supported()
    sp = request.to_sampling_params(8)
    assert (sp.n, sp.stop, sp.stop_token_ids, sp.logprobs, sp.gen_length) == (3, ["w5"], [7], 2, 8)
    chat = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "w1"}], "logprobs": True,
                                                 "top_logprobs": 4, "stop": ["a", "b"]})  # fmt: skip
    chat.check_supported()
    sp = chat.to_sampling_params(8)
    assert (sp.n, sp.stop, sp.logprobs) == (1, ["a", "b"], 4)
    assert ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "w1"}], "logprobs": True}
                                                ).to_sampling_params(8).logprobs == 0  # fmt: skip


@dataclass
class FakeLogprob:
    logprob: float
    decoded_token: str | None = None


def test_logprobs_in_openai_shapes():
    per_token = [{5: FakeLogprob(-0.1), 6: FakeLogprob(-2.5)}, {7: -0.3, 5: -1.5, 8: -4.0}]
    decode = {5: "w5", 6: "w6", 7: "w7", 8: "w8"}.__getitem__
    legacy = completion_logprobs([5, 7], per_token, 2, decode)
    parsed = strict(Logprobs, legacy.model_dump(mode="json"))
    assert parsed.tokens == ["w5", "w7"] and parsed.token_logprobs == [-0.1, -0.3] and parsed.text_offset == [0, 2]
    assert parsed.top_logprobs[1] == {"w7": -0.3, "w5": -1.5}
    chat = chat_logprobs([5, 7], per_token, 1, decode).model_dump(mode="json")
    tokens = [strict(ChatCompletionTokenLogprob, t) for t in chat["content"]]
    assert [t.token for t in tokens] == ["w5", "w7"] and [len(t.top_logprobs) for t in tokens] == [1, 1]
    assert tokens[0].bytes == list(b"w5")


def test_with_stop_strings_a_stream_sends_each_text_whole(http, monkeypatch):
    """A settled prefix may run past a stop string that cuts the text later: with stops, no partial text."""
    monkeypatch.setattr(protocol, "SamplingParams", VLLMStyleParams)
    monkeypatch.setattr(protocol, "ENGINE_FIELDS", frozenset(f.name for f in fields(VLLMStyleParams)))
    body = {**BODY, "max_tokens": 16, "stop": ["never said"], "ignore_eos": True}
    plain = http.post("/v1/completions", json=body).json()["choices"][0]
    chunks = events(http.post("/v1/completions", json={**body, "stream": True}))
    texts = [c["choices"][0]["text"] for c in chunks]
    assert texts == [plain["text"]] and chunks[0]["choices"][0]["finish_reason"] == plain["finish_reason"]
    without = events(http.post("/v1/completions", json={**body, "stop": None, "stream": True}))
    assert len(without) > 1  # the same request without stops streams as it settles


# ---- n, stop, logprobs end to end, through the real client ---------------------------------------------
def test_n_samples_through_the_client(client, http):
    r = client.completions.create(model=MODEL, prompt="w1 w2 w3", max_tokens=8, n=3, seed=5, temperature=1.0)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    alone = [
        client.completions.create(model=MODEL, prompt="w1 w2 w3", max_tokens=8, seed=5 + i, temperature=1.0)
        for i in range(3)
    ]
    # sample i is the request with seed + i: the same text as asking for it alone
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [a.choices[0].text for a in alone]
    body = http.post("/v1/completions", json={"model": MODEL, "prompt": "w1 w2", "max_tokens": 4, "n": 2}).json()
    strict(Completion, body)


def test_stop_through_the_client(client):
    full = client.completions.create(model=MODEL, prompt="w1 w2 w3", max_tokens=16, extra_body={"ignore_eos": True})
    words = full.choices[0].text.split()
    if len(words) < 2:
        pytest.skip("the tiny model produced fewer than two words")
    stop = words[1]
    r = client.completions.create(
        model=MODEL, prompt="w1 w2 w3", max_tokens=16, stop=[stop], extra_body={"ignore_eos": True}
    )
    choice = r.choices[0]
    assert stop not in choice.text and full.choices[0].text.startswith(choice.text)
    assert choice.finish_reason == "stop"


def test_logprobs_through_the_client(client):
    r = client.completions.create(model=MODEL, prompt="w1 w2 w3", max_tokens=6, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp is not None and len(lp.token_logprobs) == len(lp.tokens) > 0
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)  # the committed token + the top 2
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "w1 w2"}], max_tokens=6, logprobs=True, top_logprobs=2
    )
    content = chat.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 2 for t in content)
    plain = client.completions.create(model=MODEL, prompt="w1 w2 w3", max_tokens=6)
    assert plain.choices[0].logprobs is None
