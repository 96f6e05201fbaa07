"""The HTTP layer without any engine: auth, limits, error shapes, health and readiness."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Limits, Settings

API_KEY = "k" * 24
ADMIN_KEY = "a" * 24
CHAT = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def client(tmp_path) -> Iterator[TestClient]:
    settings = Settings(home=tmp_path, embedded_model=False, api_keys=(API_KEY,), admin_key=ADMIN_KEY,
                        limits=Limits(max_body_bytes=2048))
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def _auth(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _assert_openai_error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize("path", ["/health", "/metrics"])
def test_operations_endpoints_need_no_key(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 200


def test_ready_is_503_with_no_model(client: TestClient) -> None:
    response = client.get("/ready")
    assert response.status_code == 503
    assert response.json() == {"ready": False, "models": {}}


@pytest.mark.parametrize(
    ("headers", "fragment"),
    [({}, "missing API key"), (_auth("wrong" * 5), "invalid API key"), ({"Authorization": API_KEY}, "missing")],
)
def test_v1_requires_a_valid_bearer_key(client: TestClient, headers: dict, fragment: str) -> None:
    error = _assert_openai_error(client.post("/v1/chat/completions", json=CHAT, headers=headers), 401)
    assert fragment in error["message"]
    assert error["type"] == "authentication_error"
    assert client.get("/v1/models", headers=headers).status_code == 401


def test_models_list_with_key(client: TestClient) -> None:
    response = client.get("/v1/models", headers=_auth())
    assert response.json() == {"object": "list", "data": []}


def test_unknown_model_is_404(client: TestClient) -> None:
    error = _assert_openai_error(client.post("/v1/chat/completions", json=CHAT, headers=_auth()), 404)
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"


def test_body_over_the_limit_is_413(client: TestClient) -> None:
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 4096}]}
    error = _assert_openai_error(client.post("/v1/chat/completions", json=big, headers=_auth()), 413)
    assert "2048 bytes" in error["message"]


def test_malformed_json_is_400(client: TestClient) -> None:
    headers = {**_auth(), "content-type": "application/json"}
    response = client.post("/v1/completions", content=b"{not json", headers=headers)
    assert "not valid JSON" in _assert_openai_error(response, 400)["message"]


@pytest.mark.parametrize("depth", [65, 1_000, 100_000])
def test_a_body_nested_too_deeply_is_400_and_the_connection_keeps_serving(tmp_path, depth: int) -> None:
    # 100,000 levels raised RecursionError in the JSON decoder: a 500 that closed the connection.
    settings = Settings(home=tmp_path, embedded_model=False, api_keys=(API_KEY,))
    body = '{"model": "m", "messages": [{"role": "user", "content": "hi"}], "response_format": ' + \
        '{"a": ' * depth + "1" + "}" * depth + "}"
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        response = client.post("/v1/chat/completions", content=body,
                               headers={**_auth(), "content-type": "application/json"})  # fmt: skip
        assert "nests more than 64 levels" in _assert_openai_error(response, 400)["message"]
        shallow = '{"model": "m", "messages": [{"role": "user", "content": "hi"}], "response_format": ' + \
            '{"a": ' * 60 + "1" + "}" * 60 + "}"
        response = client.post("/v1/chat/completions", content=shallow,
                               headers={**_auth(), "content-type": "application/json"})  # fmt: skip
        assert _assert_openai_error(response, 404)["code"] == "model_not_found"


@pytest.mark.parametrize("media", [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"])
def test_a_body_not_sent_as_json_is_415(client: TestClient, media: str | None) -> None:
    # Without API keys, a cross-site form could post such a body with no preflight.
    headers = {**_auth(), **({"content-type": media} if media else {})}
    response = client.post("/v1/chat/completions", content=b'{"model": "m", "messages": []}', headers=headers)
    assert "application/json" in _assert_openai_error(response, 415)["message"]
    ok = client.post("/v1/chat/completions", content=b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}',
                     headers={**_auth(), "content-type": "application/json; charset=utf-8"})  # fmt: skip
    assert ok.status_code == 404  # past the body: no such model


def test_invalid_body_is_400_before_model_lookup(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", json={**CHAT, "n": 1000}, headers=_auth())
    assert _assert_openai_error(response, 400)["param"] == "n"


def test_unknown_route_is_openai_shaped_404(client: TestClient) -> None:
    _assert_openai_error(client.get("/v1/nothing-here", headers=_auth()), 404)


def test_admin_needs_the_admin_key(client: TestClient) -> None:
    assert client.get("/admin/engines", headers=_auth()).status_code == 401
    response = client.get("/admin/engines", headers=_auth(ADMIN_KEY))
    body = response.json()
    assert body["engines"] == []
    assert body["host"]["device"] and set(body["host"]["kernels"]) >= {"w4a16", "w8a8"}  # server/engines/probe.py


def test_errors_are_counted_in_metrics(client: TestClient) -> None:
    client.post("/v1/chat/completions", json=CHAT, headers=_auth())
    text = client.get("/metrics").text
    assert 'quantgate_requests_total{endpoint="chat",model="",status="404",tier="",variant=""} 1.0' in text


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [r for v in node.values() for r in _refs(v)]
    return [r for v in node for r in _refs(v)] if isinstance(node, list) else []


def test_the_openapi_document_resolves_and_documents_errors(client: TestClient) -> None:
    import jsonschema

    doc = client.get("/openapi.json").json()
    for ref in set(_refs(doc)):  # "#/$defs/ChatMessage" did not resolve at the document's root
        assert ref.startswith("#/"), ref
        node = doc
        for part in ref[2:].split("/"):
            node = node[part]
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert {"400", "401", "404", "413", "415", "429", "503"} <= set(chat["responses"])
    # The request schema says what the gateway accepts and refuses.
    schema = chat["requestBody"]["content"]["application/json"]["schema"]
    validator = jsonschema.Draft202012Validator(schema)
    accepted = [CHAT, {**CHAT, "stream_options": {"include_usage": True}}, {**CHAT, "temperature": 1}]
    refused = [{**CHAT, "temperature": False}, {**CHAT, "stream": "yes"}, {**CHAT, "n": "2"}, {**CHAT, "messages": []}]
    for body in accepted:
        assert validator.is_valid(body), body
        assert client.post("/v1/chat/completions", json=body, headers=_auth()).status_code == 404, body  # no model
    for body in refused:
        assert not validator.is_valid(body), body
        _assert_openai_error(client.post("/v1/chat/completions", json=body, headers=_auth()), 400)
    prompt = doc["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    for bad in ("", []):
        body = {"model": "m", "prompt": bad}
        assert not jsonschema.Draft202012Validator(prompt).is_valid(body), body
        _assert_openai_error(client.post("/v1/completions", json=body, headers=_auth()), 400)


@pytest.mark.parametrize(("peer", "host", "status"), [
    ("127.0.0.1", "127.0.0.1:8000", 200), ("127.0.0.1", "localhost", 200), ("::1", "[::1]:8000", 200),
    ("127.0.0.1", "rebound.example:8000", 403),  # DNS rebinding: a page's own name resolving to 127.0.0.1
    ("127.0.0.1", "127.0.0.1.nip.io", 403),
    ("10.0.0.7", "127.0.0.1:8000", 403),
])  # fmt: skip
def test_without_an_admin_key_admin_answers_loopback_clients_that_name_a_loopback_host(
        tmp_path, peer: str, host: str, status: int) -> None:  # fmt: skip
    settings = Settings(home=tmp_path, embedded_model=False)
    with TestClient(create_app(settings), client=(peer, 50000)) as local:
        response = local.get("/admin/models", headers={"host": host})
        assert response.status_code == status, response.text
        if status == 403:
            assert _assert_openai_error(response, 403)["code"] == "admin_only"


def test_a_wrong_method_names_every_method_of_the_path(client: TestClient) -> None:
    """Starlette's 405 named the first route's methods only: GET /admin/models/{name} hid DELETE."""
    response = client.options("/admin/models/x", headers=_auth(ADMIN_KEY))
    assert response.status_code == 405 and response.headers["allow"] == "DELETE, GET"
    assert client.put("/v1/chat/completions", headers=_auth()).headers["allow"] == "POST"


def test_a_job_id_past_sqlite_integers_is_a_400_not_a_500(client: TestClient) -> None:
    response = client.get("/admin/jobs/35833764212711196983296", headers=_auth(ADMIN_KEY))
    _assert_openai_error(response, 400)


def test_an_unexpected_error_is_a_shaped_500_that_keeps_the_connection(tmp_path) -> None:
    """Over a real uvicorn server: the 500 came from Starlette's ServerErrorMiddleware, which re-raises, and
    uvicorn then closed the connection, so the client's next request on it failed as well (issue 15)."""
    import asyncio
    import http.client
    import socket
    import threading
    import time

    import uvicorn

    app = create_app(Settings(home=tmp_path, embedded_model=False))

    async def boom() -> None:
        raise RuntimeError("a bug")

    app.add_api_route("/boom", boom)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="on"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        conn = http.client.HTTPConnection("127.0.0.1", sock.getsockname()[1], timeout=10)
        conn.request("GET", "/boom")
        first = conn.getresponse()
        body = first.read()
        assert first.status == 500
        assert first.getheader("connection") != "close"
        assert b'"type":"server_error"' in body.replace(b" ", b"")
        conn.request("GET", "/health")  # the same connection: http.client does not reconnect
        second = conn.getresponse()
        assert second.status == 200, second.read()
        conn.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
