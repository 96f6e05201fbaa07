"""`quantgate models ...`: manage the registry of a running gateway through its admin API."""

from __future__ import annotations

import json
import os
import time

import httpx
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

app = typer.Typer(help="Register, list and remove models (talks to a running `quantgate serve`).",
                  no_args_is_help=True)
console = Console()
if not console.is_terminal:  # logs and pipes: don't squeeze the table into 80 columns
    console = Console(width=160)
TERMINAL = {"ready", "rejected", "failed", "unsupported"}


def _client(url: str | None) -> httpx.Client:
    host = os.environ.get("QUANTGATE_HOST", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = url or f"http://{host}:{os.environ.get('QUANTGATE_PORT', '8000')}"
    headers = {}
    if key := os.environ.get("QUANTGATE_ADMIN_KEY"):
        headers["Authorization"] = f"Bearer {key}"
    return httpx.Client(base_url=base, headers=headers, timeout=600, trust_env=False)


def _call(client: httpx.Client, method: str, path: str, **kwargs: object) -> dict:
    try:
        response = client.request(method, path, **kwargs)
    except httpx.ConnectError:
        console.print(f"[red]no gateway at {client.base_url}[/red]: start one with `quantgate serve`")
        raise typer.Exit(1) from None
    if response.status_code >= 400:
        message = response.json().get("error", {}).get("message", response.text)
        console.print(f"[red]{response.status_code}[/red] {message}")
        raise typer.Exit(1)
    return response.json()


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def progress_note(progress: dict | None) -> str:
    """A build in progress in words: `calibrating, layer 12 of 30, ████░░░░░░ 37%, ETA 3m 20s (4m 02s in)`."""
    if not progress:
        return ""
    parts = [progress["phase"]] + ([progress["detail"]] if progress.get("detail") else [])
    if progress.get("fraction") is not None:
        filled = round(10 * progress["fraction"])
        parts.append(f"{'█' * filled}{'░' * (10 - filled)} {progress['fraction']:.0%}")
    if progress.get("eta_s") is not None:
        parts.append(f"ETA {_duration(progress['eta_s'])}")
    return ", ".join(parts) + f" ({_duration(progress['elapsed_s'])} in)"


def variants_table(models: list[dict]) -> Table:
    table = Table("variant", "method", "bits", "state", "MB", "ppl", "ppl delta", "KL", "top-1", "chat", "made in s",
                  "note")
    for model in models:
        for v in model["variants"]:
            size = None if v["size_bytes"] is None else v["size_bytes"] / 1e6
            delta = "-" if v["ppl_delta"] is None else f"{100 * v['ppl_delta']:+.1f}%"
            color = {"ready": "green", "failed": "red", "rejected": "yellow", "unsupported": "magenta"}.get(v["state"], "cyan")
            agreement, chat = v.get("next_token") or {}, v.get("chat") or {}
            table.add_row(v["id"], v["method"], str(v["bits"]), f"[{color}]{v['state']}[/{color}]",
                          _fmt(size, ".0f"), _fmt(v["ppl"], ".3f"), delta, _fmt(agreement.get("kld"), ".3f"),
                          _fmt(agreement.get("top1"), ".2f"),
                          f"{chat['correct']}/{chat['prompts']}" if chat.get("prompts") else "-",
                          _fmt(v["seconds_to_make"], ".0f"),
                          (v["reason"] or progress_note(v.get("progress")) or "")[:240])  # fmt: skip
    return table


def parse_variant(text: str) -> dict:
    """`--variant NAME=METHOD[:JSON]` as the admin API's variant object: `pruned-1=prune-structured:{"drop_layers":
    1}` -> {"name": "pruned-1", "method": "prune-structured", "config": {"drop_layers": 1}}."""
    name, sep, rest = text.partition("=")
    method, colon, fields = rest.partition(":")
    if not sep or not name.strip() or not method.strip():
        raise typer.BadParameter(f"{text!r}: expected NAME=METHOD or NAME=METHOD:JSON")
    config = {}
    if colon:
        try:
            config = json.loads(fields)
        except ValueError:
            raise typer.BadParameter(f"{text!r}: the fields after ':' are not JSON") from None
        if not isinstance(config, dict):
            raise typer.BadParameter(f"{text!r}: the fields after ':' must be a JSON object")
    return {"name": name.strip(), "method": method.strip(), "config": config}


def _rungs(variants: str | None, variant: list[str] | None, max_ppl_delta: float | None) -> dict:
    """The body's `variants` (--variants' methods, then each --variant) and `max_ppl_delta`, where given."""
    body: dict = {}
    if variants is not None:
        body["variants"] = [m.strip() for m in variants.split(",") if m.strip()]
    if variant:
        body["variants"] = body.get("variants", []) + [parse_variant(v) for v in variant]
    if max_ppl_delta is not None:
        body["max_ppl_delta"] = max_ppl_delta
    return body


@app.command("add")
def add(
    path: str = typer.Argument(..., help="HF checkpoint directory or .gguf file (a path on the gateway's host)"),
    name: str = typer.Option(..., "--name", help="logical model name, e.g. llama-3.1-8b"),
    variants: str = typer.Option(None, "--variants", help="comma-separated methods, e.g. int8,int4-gptq,awq"),
    variant: list[str] = typer.Option(None, "--variant", help="a rung with its own name and fields, as "
                                      "NAME=METHOD:JSON, e.g. 'pruned-1=prune-structured:{\"drop_layers\": 1}' "
                                      "(repeatable; added to --variants' rungs, or the only ones without it)"),
    max_ppl_delta: float = typer.Option(None, "--max-ppl-delta", help="quality floor, e.g. 0.3 for +30%"),
    tool_call_parser: str = typer.Option(None, "--tool-call-parser",
                                         help="vLLM's parser for the model's tool calls, e.g. hermes"),
    wait: bool = typer.Option(True, help="follow the build until every variant is ready, rejected or failed"),
    url: str = typer.Option(None, help="gateway URL (default from QUANTGATE_HOST/PORT)"),
) -> None:
    """Register a checkpoint and build its variants (progress shown until done)."""
    body: dict = {"path": os.path.abspath(path) if os.path.exists(path) else path, "name": name}
    body.update(_rungs(variants, variant, max_ppl_delta))
    if tool_call_parser is not None:
        body["tool_call_parser"] = tool_call_parser
    with _client(url) as client:
        model = _call(client, "POST", "/admin/models", json=body)
        _follow(client, model, name, wait)


@app.command("merge")
def merge(
    models: list[str] = typer.Argument(..., help="registered models of one architecture (slerp: exactly two)"),
    name: str = typer.Option(..., "--name", help="the merged model's name"),
    t: str = typer.Option("0.5", "--t", help="slerp: 0 is the first model, 1 the second; or a JSON schedule, e.g. "
                          "'[0, 0.5, 1]' over the layers or '[{\"filter\": \"self_attn\", \"value\": 0.3}, "
                          "{\"value\": 0.6}]'"),
    method: str = typer.Option("slerp", "--method", help="slerp or linear"),
    weights: str = typer.Option(None, "--weights", help="linear: comma-separated, one per model"),
    variants: str = typer.Option(None, "--variants", help="comma-separated methods of the merged model's rungs"),
    variant: list[str] = typer.Option(None, "--variant", help="a rung as NAME=METHOD:JSON (repeatable)"),
    max_ppl_delta: float = typer.Option(None, "--max-ppl-delta", help="quality floor, e.g. 0.3 for +30%"),
    wait: bool = typer.Option(True, help="follow the build until every variant is ready, rejected or failed"),
    url: str = typer.Option(None, help="gateway URL (default from QUANTGATE_HOST/PORT)"),
) -> None:
    """Merge registered models into a new one (SLERP or linear), then build and gate it like any model."""
    try:
        schedule = json.loads(t)
    except ValueError:
        raise typer.BadParameter(f"--t {t!r} is neither a number nor JSON") from None
    body: dict = {"models": models, "name": name, "method": method, "t": schedule}
    if weights is not None:
        try:
            body["weights"] = [float(w) for w in weights.split(",")]
        except ValueError:
            raise typer.BadParameter(f"--weights {weights!r}: comma-separated numbers") from None
    body.update(_rungs(variants, variant, max_ppl_delta))
    with _client(url) as client:
        model = _call(client, "POST", "/admin/merges", json=body)
        _follow(client, model, name, wait)


def _follow(client: httpx.Client, model: dict, name: str, wait: bool) -> None:
    """Show the model's variants until every one is ready, rejected, failed or unsupported; exit 1 if one failed."""
    if not wait:
        console.print(variants_table([model]))
        return
    with Live(variants_table([model]), console=console, refresh_per_second=2) as live:
        while not all(v["state"] in TERMINAL for v in model["variants"]):
            time.sleep(2)
            model = _call(client, "GET", f"/admin/models/{name}")
            live.update(variants_table([model]))
    failed = [v["id"] for v in model["variants"] if v["state"] == "failed"]
    raise typer.Exit(1 if failed else 0)


@app.command("export")
def export(
    name: str = typer.Argument(..., help="a registered model"),
    variant: str = typer.Option("bf16", "--variant", help="its base (bf16) or a dense variant (pruned, distilled)"),
    precision: str = typer.Option("int4", "--precision", help="fp32, int8 or int4 (ONNX Runtime's MatMulNBits)"),
    output: str = typer.Option(None, "-o", "--output", help="the tar to write (default NAME-VARIANT-onnx-PRECISION.tar)"),
    url: str = typer.Option(None, help="gateway URL (default from QUANTGATE_HOST/PORT)"),
) -> None:
    """Download the model as an ONNX Runtime GenAI model for edge devices (GET /admin/models/NAME/export/onnx),
    waiting while the gateway exports it."""
    path = f"/admin/models/{name}/export/onnx"
    params = {"variant": variant, "precision": precision}
    with _client(url) as client, console.status(f"exporting {name}@{variant} to ONNX ({precision})"):
        while True:
            try:
                response = client.get(path, params=params)
            except httpx.ConnectError:
                console.print(f"[red]no gateway at {client.base_url}[/red]: start one with `quantgate serve`")
                raise typer.Exit(1) from None
            if response.status_code != 202:
                break
            time.sleep(float(response.headers.get("retry-after", "5")))
    if response.status_code != 200:
        message = response.json().get("error", {}).get("message", response.text)
        console.print(f"[red]{response.status_code}[/red] {message}")
        raise typer.Exit(1)
    target = output or f"{name}-{variant}-onnx-{precision}.tar"
    with open(target, "wb") as file:
        file.write(response.content)
    console.print(f"wrote {target} ({len(response.content) / 1e6:.1f} MB): `tar xf` it, then load the directory "
                  "with onnxruntime_genai.Model")


@app.command("list")
def list_models(url: str = typer.Option(None, help="gateway URL")) -> None:
    """Every registered model and variant, with state and measured quality."""
    with _client(url) as client:
        console.print(variants_table(_call(client, "GET", "/admin/models")["models"]))


@app.command("rm")
def remove(name: str, url: str = typer.Option(None, help="gateway URL")) -> None:
    """Remove a model: its engines stop, its records go (built artifacts stay cached)."""
    with _client(url) as client:
        _call(client, "DELETE", f"/admin/models/{name}")
    console.print(f"removed {name}")


@app.command("routing")
def routing(name: str, url: str = typer.Option(None, help="gateway URL")) -> None:
    """What the router does with NAME now: per device its active rung, what each rung would do with
    the last window's traffic, and which rungs are worth keeping resident (GET /admin/routing/NAME)."""
    with _client(url) as client:
        view = _call(client, "GET", f"/admin/routing/{name}")
    table = Table("device", "rung", "role", "budgets met if it took the traffic", "in flight then", "value", "why")
    for regime in view["devices"]:
        advice = view["recommendation"].get(regime["device"], {})
        resident = set(advice.get("resident", []))
        for rung in regime["rungs"]:
            role = "active" if rung["variant"] == regime["active"] else (
                "keep resident" if rung["variant"] in resident else "could unload")
            table.add_row(regime["device"], rung["variant"], role, f"{rung['attainment']:.0%}",
                          _fmt(rung["concurrency"], ".1f") if rung["concurrency"] is not None else "saturates",
                          f"{rung['value']:.2f}", advice.get("reasons", {}).get(rung["variant"], ""))  # fmt: skip
    console.print(table)
    if not view["devices"]:
        console.print("no shared-device regime yet (no traffic in the window, or `shared_device.policy` is spread)")
    for device, advice in view["recommendation"].items():
        console.print(f"{device}: {advice.get('summary') or advice.get('reason')}")
