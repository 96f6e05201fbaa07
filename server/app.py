"""The app factory: routers, error handlers, and a lifespan that owns engines and clients."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from server import __version__
from server.api import admin_routes, openai_routes, ops_routes
from server.api.openapi import document
from server.bootstrap import Bootstrap, local_engine_config
from server.catalog import Catalog
from server.drain import Drain
from server.engines.client import EngineClient, build_http_client, build_upstream_session
from server.engines.hardware import detect
from server.engines.probe import probe as probe_kernels
from server.engines.supervisor import EngineSupervisor
from server.errors import install_error_handlers
from server.gateway import Gateway
from server.metrics import GatewayMetrics
from server.registry.builder import VariantBuilder
from server.registry.service import ModelService
from server.registry.store import Registry
from server.routing.predictor import LatencyBook
from server.settings import Settings
from server.telemetry.engine_load import EngineLoadScraper

logger = logging.getLogger(__name__)

GC_GEN0_THRESHOLD = 50_000  # CPython's default is 700


def create_app(settings: Settings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        http = build_http_client(settings.upstream_connect_timeout_s, settings.upstream_read_timeout_s,
                                 settings.upstream_max_connections)
        supervisor = EngineSupervisor()
        catalog = Catalog()
        hardware = detect(settings.engine_device)
        logger.info("engines on %s (native bf16 on CPU: %s)", hardware.device, hardware.cpu_native_bf16)
        registry = Registry(settings.registry_path)
        catalog.follow(registry)
        book = LatencyBook()
        load = EngineLoadScraper(supervisor.engines, http, settings.load_scrape_interval_s)
        builder = VariantBuilder(
            registry, supervisor, settings.home,
            engine_config=lambda vid, path, args: local_engine_config(settings, hardware, vid, path, args),
            remote_engines=dict(settings.remote_engines), book=book,
            profile=settings.registry_profile, compress_timeout_s=settings.compress_timeout_s,
            compress_python=settings.compress_python, engine_ready_timeout_s=settings.engine_start_timeout_s,
            chat_gate_for=settings.chat_gate_for,
        )  # fmt: skip
        kernels = await asyncio.to_thread(probe_kernels, hardware.device, settings.cache_dir)
        logger.info("engine kernels here: %s (%s, %s)", kernels.kernels, kernels.library or hardware.device,
                    kernels.source)
        service = ModelService(settings, registry, builder, supervisor, hardware.device, kernels)
        metrics = GatewayMetrics(supervisor.statuses, load.all, catalog, registry,
                                 builder.progress.views)
        per_engine = max([settings.engine_max_in_flight] + [r.max_in_flight or 0 for r in settings.remote_engines.values()])
        upstream = EngineClient(build_upstream_session(settings.upstream_connect_timeout_s,
                                                       settings.upstream_read_timeout_s, per_engine))  # fmt: skip
        gateway = Gateway(settings, catalog, supervisor, upstream, metrics, service, book, load,
                          app.state.drain)
        app.state.gateway = gateway  # the serving service; the others for the admin and ops routes
        app.state.settings, app.state.models, app.state.catalog = settings, service, catalog
        app.state.supervisor, app.state.book, app.state.metrics, app.state.load = supervisor, book, metrics, load
        boot = asyncio.create_task(Bootstrap(settings, registry, builder, service, catalog, supervisor).run(),
                                   name="bootstrap")
        boot.add_done_callback(_log_bootstrap_failure)
        scraper = asyncio.create_task(load.run(), name="engine-load")
        regimes = asyncio.create_task(gateway.run_concentrators(), name="shared-device-regimes")
        _tune_gc()
        try:
            yield
        finally:
            for task in (boot, scraper, regimes):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await supervisor.stop_all()
            await upstream.aclose()
            await http.aclose()
            registry.close()

    app = FastAPI(title="quantgate", version=__version__, lifespan=lifespan)
    app.state.drain = Drain()  # the server (server/cli.py) begins it at SIGTERM
    install_error_handlers(app)
    document(app, settings.limits)
    app.include_router(openai_routes.router)
    app.include_router(ops_routes.router)
    app.include_router(admin_routes.router)
    return app


def _tune_gc() -> None:
    """Keep the cyclic garbage collector off the request path. Everything built at start-up lives
    as long as the process: frozen, later collections stop re-scanning it. A request allocates a
    few hundred containers, almost all freed by reference counting, so a larger first generation
    runs collections ~70x less often (py-spy: gc_collect_main was ~8 % of the gateway's samples
    under streaming load before this)."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def _log_bootstrap_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("start-up failed, nothing will be served: %s", task.exception(), exc_info=task.exception())
