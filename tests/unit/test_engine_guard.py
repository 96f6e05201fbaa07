"""The key on every route of a local engine (server/engines/engine_guard.py), over a stand-in ASGI app;
tests/integration/test_lifecycle.py checks it inside a real vLLM engine."""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from server.engines.engine_guard import KEY_ENV, EngineGuard
from server.engines.local import LocalEngine, LocalEngineConfig
from server.engines.remote import RemoteEngine
from server.settings import RemoteEngineSpec, Settings

KEY = "s3cret-engine-key"
PATHS = ["/v1/models", "/tokenize", "/detokenize", "/metrics", "/version", "/pooling", "/scale_elastic_ep",
         "/v2/whatever", "/health/../v1/models", "/HEALTH", "/healthz"]  # fmt: skip


def _ok(request):  # noqa: ANN001, ANN202
    return PlainTextResponse("ok")


def _client(monkeypatch: pytest.MonkeyPatch, key: str | None) -> TestClient:
    if key is None:
        monkeypatch.delenv(KEY_ENV, raising=False)
    else:
        monkeypatch.setenv(KEY_ENV, key)
    app = Starlette(routes=[Route("/{path:path}", _ok, methods=["GET", "POST", "HEAD"])])
    app.add_middleware(EngineGuard)
    return TestClient(app)


@pytest.mark.parametrize("path", PATHS)
def test_every_route_but_liveness_asks_the_key(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    client = _client(monkeypatch, KEY)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": f"Bearer {KEY}x"}):  # fmt: skip
        for method in ("GET", "POST"):
            response = client.request(method, path, headers=headers)
            assert response.status_code == 401, (method, path, headers)
            assert response.json()["error"]["type"] == "unauthorized"
            assert response.headers["www-authenticate"] == "Bearer"
    assert client.post(path, headers={"Authorization": f"Bearer {KEY}"}).text == "ok"
    assert client.get(path, headers={"authorization": f"bearer {KEY}"}).text == "ok"


def test_liveness_probes_stay_open(monkeypatch: pytest.MonkeyPatch) -> None:
    client = _client(monkeypatch, KEY)
    assert client.get("/health").text == "ok" and client.get("/ping").text == "ok"
    assert client.post("/health").status_code == 401  # only the probe's own methods


def test_no_key_in_the_environment_guards_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    client = _client(monkeypatch, None)
    assert client.post("/tokenize").text == "ok"


def test_a_local_engine_is_started_with_its_own_key_in_its_environment() -> None:
    config = LocalEngineConfig("m@bf16", Path("/m"), "cpu", "bfloat16", 2048, Path("/logs"),
                               extra_env=((KEY_ENV, "from-extra-env"),))  # fmt: skip
    one, two = LocalEngine(config), LocalEngine(config)
    assert one.auth_headers != two.auth_headers  # a key per engine
    key = one.auth_headers["Authorization"].removeprefix("Bearer ")
    assert len(key) >= 32 and config.environment(key)[KEY_ENV] == key
    argv = config.command(8100)
    assert argv[argv.index("--middleware") + 1] == "server.engines.engine_guard.EngineGuard"
    assert key not in " ".join(argv)  # argv is what `ps` shows
    assert key not in repr(one.status())


def test_a_remote_engine_sends_its_declared_key() -> None:
    spec = RemoteEngineSpec.model_validate({"url": "http://10.0.0.5:8000", "api_key": KEY})
    assert KEY not in repr(spec) and KEY not in str(spec.model_dump())
    engine = RemoteEngine("m@bf16", str(spec.url), api_key=spec.auth_key())
    assert engine.auth_headers == {"Authorization": f"Bearer {KEY}"}
    assert RemoteEngine("m@bf16", "http://10.0.0.5:8000").auth_headers == {}


def test_one_key_for_every_remote_engine_that_declares_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kubernetes: one Secret holds the engines' key (k8s/engine/deployment.yaml, gateway-deployment.yaml)."""
    monkeypatch.setenv("QUANTGATE_REMOTE_ENGINE_KEY", KEY)
    engines = '{"m@a": "http://a:8000", "m@b": {"url": "http://b:8000", "api_key": "own"}}'
    monkeypatch.setenv("QUANTGATE_REMOTE_ENGINES", engines)
    settings = Settings(embedded_model=False)
    assert {k: v.auth_key() for k, v in settings.remote_engines.items()} == {"m@a": KEY, "m@b": "own"}
    monkeypatch.setenv("QUANTGATE_REMOTE_ENGINE_KEY", "")  # compose's ${VAR:-}: no key
    assert Settings(embedded_model=False).remote_engines["m@a"].auth_key() is None
