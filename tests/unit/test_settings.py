"""Settings from QUANTGATE_* variables, validated with clear messages."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.settings import Settings

KEY_A = "a" * 20
KEY_B = "b" * 20


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name in ("QUANTGATE_API_KEYS", "QUANTGATE_ADMIN_KEY", "QUANTGATE_PORT", "QUANTGATE_HOME"):
        monkeypatch.delenv(name, raising=False)


def test_defaults() -> None:
    settings = Settings()
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.api_keys == ()
    assert settings.home.name == "quantgate"


@pytest.mark.parametrize("raw", [f"{KEY_A},{KEY_B}", f" {KEY_A} , {KEY_B} ", f'["{KEY_A}", "{KEY_B}"]'])
def test_api_keys_from_env(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("QUANTGATE_API_KEYS", raw)
    assert Settings().api_keys == (KEY_A, KEY_B)


@pytest.mark.parametrize("raw", ["", "  "])
def test_empty_keys_are_unset_as_compose_passes_them(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    # deploy/compose.yaml: QUANTGATE_ADMIN_KEY: ${QUANTGATE_ADMIN_KEY:-}, likewise the API keys.
    monkeypatch.setenv("QUANTGATE_ADMIN_KEY", raw)
    monkeypatch.setenv("QUANTGATE_API_KEYS", raw)
    settings = Settings()
    assert settings.admin_key is None and settings.api_keys == ()


def test_port_and_home_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("QUANTGATE_PORT", "9001")
    monkeypatch.setenv("QUANTGATE_HOME", str(tmp_path / "h"))
    settings = Settings()
    assert settings.port == 9001
    assert settings.logs_dir == tmp_path / "h" / "logs"


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"QUANTGATE_API_KEYS": "short"}, "shorter than 16"),
        ({"QUANTGATE_ADMIN_KEY": "short"}, "shorter than 16"),
        ({"QUANTGATE_API_KEYS": KEY_A, "QUANTGATE_ADMIN_KEY": KEY_A}, "must differ"),
        ({"QUANTGATE_PORT": "70000"}, "less than or equal to 65535"),
        ({"QUANTGATE_REMOTE_ENGINES": '{"nomodel": "http://127.0.0.1:1"}'}, "model@variant"),
        ({"QUANTGATE_REMOTE_ENGINES": '{"m@v": "not a url"}'}, "URL"),
        ({"QUANTGATE_ENGINE_DTYPE": "int3"}, "Input should be"),
    ],
)
def test_bad_settings_are_refused_with_a_clear_message(monkeypatch: pytest.MonkeyPatch, env: dict,
                                                       fragment: str) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=fragment):
        Settings()


def test_a_model_s_own_chat_gate_replaces_the_gateway_s(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANTGATE_CHAT_GATE", '{"max_kld": 0.1}')
    monkeypatch.setenv("QUANTGATE_MODEL_CHAT_GATE", '{"big": {"max_kld": 0.3, "min_top1": 0.7}}')
    settings = Settings()
    assert settings.chat_gate_for("other").max_kld == 0.1
    own = settings.chat_gate_for("big")
    assert (own.max_kld, own.min_top1, own.max_correct_drop) == (0.3, 0.7, 0.125)  # the rest: defaults
    monkeypatch.setenv("QUANTGATE_MODEL_CHAT_GATE", '{"big": {"max_kld": -1}}')
    with pytest.raises(ValidationError, match="max_kld"):
        Settings()
