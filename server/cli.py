"""The `quantgate` command line."""

from __future__ import annotations

import contextlib
import logging

import typer
from pydantic import ValidationError
from rich.console import Console

app = typer.Typer(help="quantgate: an OpenAI-compatible gateway over a precision ladder of one model.",
                  no_args_is_help=True)
console = Console(stderr=True)


def _add_subcommands() -> None:
    from server.cli_models import app as models_app

    app.add_typer(models_app, name="models")


_add_subcommands()


def _load_settings(**overrides: object):  # noqa: ANN202
    from server.settings import Settings

    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        console.print("[red]invalid settings:[/red]")
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "settings"
            console.print(f"  QUANTGATE_{where.upper()}: {err['msg']}")
        raise typer.Exit(2) from None


@app.command()
def serve(
    host: str | None = typer.Option(None, help="bind address (QUANTGATE_HOST)"),
    port: int | None = typer.Option(None, help="port (QUANTGATE_PORT)"),
) -> None:
    """Serve the gateway (and, by default, the bundled SmolLM2-135M-Instruct)."""
    import uvicorn

    from server.app import create_app
    from server.drain import DrainingServer

    settings = _load_settings(host=host, port=port)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health poll otherwise
    settings.home.mkdir(parents=True, exist_ok=True)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_keys:
        logging.getLogger("server").warning(
            "listening on %s with no QUANTGATE_API_KEYS: /v1/* is open to anyone who can reach it", settings.host
        )
    api = create_app(settings)
    # Forwarded headers only from the proxies configured (uvicorn believes any loopback peer by default).
    # At SIGTERM the gateway drains first (server/drain.py); uvicorn's own grace then covers what is left.
    config = uvicorn.Config(api, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=False, timeout_graceful_shutdown=5, timeout_keep_alive=settings.keep_alive_s,
                            proxy_headers=bool(settings.trusted_proxies),
                            forwarded_allow_ips=",".join(settings.trusted_proxies) or None)  # fmt: skip

    def in_flight() -> int:
        gateway = getattr(api.state, "gateway", None)  # there once the lifespan has started
        return gateway.requests_in_flight() if gateway is not None else 0

    # uvicorn re-raises the signal it caught once shut down; Ctrl-C is then a clean exit, as in uvicorn.run.
    with contextlib.suppress(KeyboardInterrupt):
        DrainingServer(config, api.state.drain, in_flight, settings.drain_grace_s).run()


@app.command()
def version() -> None:
    """Print the version."""
    from server import __version__

    typer.echo(__version__)


if __name__ == "__main__":
    app()
