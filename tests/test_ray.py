"""Ray on a local loopback cluster: Ray Data over two engine actors, Ray Serve with two replicas.

Settings from shared/RAY_NOTES.md: loopback-only node, no auth token, no usage stats (all set before
``import ray``); one cluster for the module; at most 0.5 CPU per actor or replica so nothing waits
forever for a CPU; every ``serve.run`` bounded by a timeout.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import socket  # noqa: E402

import pytest  # noqa: E402

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

from maskkv_engine import LLM, SamplingParams  # noqa: E402
from maskkv_engine.distributed import ray_data  # noqa: E402
from tests.conftest import prompt_ids  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_local():
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=256 * 1024**2,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_data_two_engines_match_one_llm(ray_local, llada_dir):
    """One pipeline (actor start-up dominates): text prompts, one seeded SamplingParams per prompt."""
    prompts = [" ".join(f"w{t}" for t in prompt_ids(n, seed=n, high=150)) for n in (4, 9, 17, 30, 6, 12, 25, 3)]
    params = [SamplingParams(gen_length=8, steps=8, temperature=1.0, seed=40 + i) for i in range(len(prompts))]
    expected = LLM(str(llada_dir), kv_policy="full").generate(prompts, params, use_tqdm=False)
    outs = ray_data.generate(
        prompts, str(llada_dir), params, num_engines=2, num_cpus_per_engine=0.5, batch_size=2, kv_policy="full"
    )
    assert [o.token_ids for o in outs] == [e.outputs[0].token_ids for e in expected]
    assert [o.text for o in outs] == [e.outputs[0].text for e in expected]
    assert [o.finish_reason for o in outs] == [e.outputs[0].finish_reason for e in expected]


@pytest.mark.timeout(180)
def test_ray_serve_two_replicas_answer_the_openai_client(ray_local, llada_dir):
    from maskkv_engine.distributed.ray_serve import build_serve_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        app = build_serve_app(str(llada_dir), served_model_name="tiny", num_replicas=2, num_cpus_per_replica=0.5,
                              api_key="k", kv_policy="full", max_num_seqs=8)  # fmt: skip
        serve.run(app, name="maskkv", route_prefix="/")
        replicas = serve.status().applications["maskkv"].deployments["maskkv-openai"].replica_states
        assert replicas == {"RUNNING": 2}
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        sp = SamplingParams(gen_length=8, steps=8, temperature=1.0, seed=5)
        expected = LLM(str(llada_dir), kv_policy="full").generate("w1 w2 w3", sp, use_tqdm=False)[0].outputs[0].text
        kw = dict(model="tiny", prompt="w1 w2 w3", max_tokens=8, temperature=1.0, seed=5)
        for _ in range(4):  # both replicas give the same text for the same seed
            assert client.completions.create(**kw).choices[0].text == expected
        chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_denoising": True}))
        assert len(chunks) > 2 and "".join(c.choices[0].text for c in chunks) == expected
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w1"}], max_tokens=4)
        assert chat.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bad", max_retries=0).models.list()
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny", prompt="w1", max_tokens=-3)
    finally:
        serve.shutdown()
