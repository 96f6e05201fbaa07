"""The serving service: what happens to a request once HTTP has handed it over.

`server/api/openai_routes.py` owns HTTP (reading and parsing the body, the client going away,
building the response); this service sees no HTTP. Its request path, in order:

    plan   = route(request)        resolve the model, build the features and the budget (routing
                                   policy: `RoutingConfig.budget`), snapshot the candidates and
                                   decide (`server.routing`, a pure Router over frozen snapshots)
    answer = await send(plan)      forward to the chosen engine, retrying on the next candidate
                                   while nothing has reached the client, counting what is in flight
    observations.record(...)       when the answer ends: metrics and the latency book's corrections

with frozen types between the steps (server/serving_types.py: ServeRequest -> Plan -> Answer | Streamed).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from server.catalog import Catalog, LogicalModel, Variant
from server.drain import Drain
from server.engines.client import EngineClient
from server.engines.streaming import StreamTiming, relay
from server.engines.supervisor import EngineSupervisor
from server.errors import (
    EnginesAtCapacity,
    EngineUnavailable,
    InvalidRequest,
    NoVariantWithinBudget,
    VariantNotServed,
)
from server.metrics import GatewayMetrics
from server.observations import Call, Observations, Observed
from server.registry.service import ModelService
from server.routing.concentrate import Concentrator, DeviceRegime, device_priced, standby_map
from server.routing.config import RoutingConfig
from server.routing.predictor import Admissions, LatencyBook, RawPrediction
from server.routing.router import Router
from server.routing.types import Budget, Candidate, Decision, EngineLoad, RequestFeatures
from server.serving_types import Answer, Plan, RequestLabels, ServeRequest, Streamed, Watch, unwatched
from server.settings import Settings
from server.telemetry.engine_load import EngineLoadScraper

logger = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's status for "client closed request"; never sent, only counted
class Gateway:
    def __init__(self, settings: Settings, catalog: Catalog, supervisor: EngineSupervisor, engines: EngineClient,
                 metrics: GatewayMetrics, models: ModelService, book: LatencyBook, load: EngineLoadScraper,
                 drain: Drain | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.drain = drain or Drain()
        self.models = models
        self.catalog = catalog
        self.supervisor = supervisor
        self.engines = engines
        self.metrics = metrics
        self.book = book
        self.load = load
        self.observations = Observations(metrics, book)
        self.in_flight: Counter[str] = Counter()
        # Of those, the streams with no first token yet, and their prompt tokens (EngineLoad.prefilling)
        self.prefilling: Counter[str] = Counter()
        self.prefill_tokens: Counter[str] = Counter()
        self.admissions = Admissions()
        self._routers: dict[str, Router] = {}
        self._concentrators: dict[str, Concentrator] = {}

    def serving_variant_ids(self) -> set[str]:
        return {s.variant_id for s in self.supervisor.statuses() if s.serving}

    def requests_in_flight(self) -> int:
        """Requests sent to an engine and not yet answered (streams until their last chunk)."""
        return sum(self.in_flight.values())

    def readiness(self) -> dict[str, bool]:
        """Per logical model: does it have at least one serving variant?"""
        serving = self.serving_variant_ids()
        return {m.name: any(v.servable and v.id in serving for v in m.variants) for m in self.catalog.models()}

    def router(self, model: str) -> Router:
        if model not in self._routers:
            self._routers[model] = Router(self.settings.routing_for(model))
        return self._routers[model]

    def concentrator(self, model: str) -> Concentrator:
        if model not in self._concentrators:
            self._concentrators[model] = Concentrator(self.settings.routing_for(model).shared_device)
        return self._concentrators[model]

    def evaluate_concentrators(self, now: float) -> None:
        """Re-choose the active rung of every shared device whose evaluation is due (off the request path)."""
        serving = {s.variant_id: s.device for s in self.supervisor.statuses() if s.serving}
        for model in self.catalog.models():
            concentrator = self.concentrator(model.name)
            if concentrator.due(now):
                rungs = [(v, serving[v.id]) for v in model.variants if v.servable and v.id in serving]
                before = {device: regime.active for device, regime in concentrator.regimes.items()}
                concentrator.evaluate(rungs, device_priced(self.book.get, concentrator, serving), now,
                                      self._largest_batch)
                for device, regime in concentrator.regimes.items():
                    if regime.active != before.get(device):
                        self._switched(model.name, device, before.get(device), regime)

    def _switched(self, model: str, device: str, previous: str | None, regime: DeviceRegime) -> None:
        """A device's active rung changed: logged with the reason and counted, so a switch (and what it cost)
        can be found against the traffic afterwards."""
        logger.info("%s on %s: active rung %s -> %s (%s)", model, device, previous or "none", regime.active or "none",
                    regime.reason)
        self.metrics.rung_switches.labels(model, device, regime.active or "").inc()
        rungs = {o.variant_id for o in regime.outlooks} | {previous, regime.active}
        for variant_id in rungs - {None}:
            self.metrics.active_rung.labels(model, device, variant_id).set(float(variant_id == regime.active))

    def _largest_batch(self, variant_id: str) -> int | None:
        latency = self.book.get(variant_id)
        return latency.priors.step_ms[-1][0] if latency is not None and latency.priors.step_ms else None

    async def run_concentrators(self, interval_s: float = 0.25) -> None:
        while True:
            try:
                self.evaluate_concentrators(time.monotonic())
            except Exception:  # a bad evaluation must not stop the next one
                logger.exception("choosing the active rungs failed")
            await asyncio.sleep(interval_s)

    # --- snapshots and decisions (no I/O) ---------------------------------------------------

    def features(self, model: str, request: ServeRequest, config: RoutingConfig) -> RequestFeatures:
        budget = config.budget(request.own_budget, request.tier, request.stream)
        output = request.max_tokens or self.book.completion_lengths(model).quantile(config.output_tokens_quantile,
                                                                                   config.default_output_tokens)
        return RequestFeatures(request.prompt_tokens, output, budget, request.tier)

    def candidates(self, model: LogicalModel, features: RequestFeatures
                   ) -> tuple[list[Candidate], dict[str, RawPrediction]]:  # fmt: skip
        statuses = self.supervisor.statuses()
        serving = {s.variant_id for s in statuses if s.serving}
        device = {s.variant_id: s.device for s in statuses}
        # Busy engines per device group (local: this host; remote: the spec's device or the URL's
        # host), across every model: engines of one device share its compute whatever they serve.
        busy = Counter(device[v] for v in device if device[v] and self._busy(v))
        candidates, raws = [], {}
        for variant in model.variants:
            gauges = self.load.gauges(variant.id)
            where = device.get(variant.id, "")
            peers = busy[where] - self._busy(variant.id) if where else 0
            load = EngineLoad(self.in_flight[variant.id], gauges.running, gauges.waiting, gauges.kv_usage, peers,
                              where, self.prefilling[variant.id], self.prefill_tokens[variant.id])  # fmt: skip
            latency = self.book.get(variant.id)
            prediction = None
            if latency is not None:
                prediction = latency.predict(features.prompt_tokens, features.output_tokens, load)
                raws[variant.id] = RawPrediction(*latency.raw(features.prompt_tokens, features.output_tokens, load),
                                                 load.idle, where or variant.id)
            candidates.append(Candidate(variant, variant.id in serving, load, prediction))
        return candidates, raws

    @staticmethod
    def _mark_standby(concentrator: Concentrator, candidates: list[Candidate]) -> list[Candidate]:
        """Flag the rungs of a device whose active rung is another one that can take the request."""
        available = {c.variant.id: c.load.device for c in candidates if c.serving and c.variant.servable}
        standby = standby_map(concentrator, available)
        if not any(standby.values()):
            return candidates
        return [replace(c, standby=True, device_rate_rps=concentrator.rate(c.load.device))
                if standby.get(c.variant.id) else c for c in candidates]  # fmt: skip

    def _at_capacity(self, features: RequestFeatures, full: list[Candidate], what: str) -> EnginesAtCapacity:
        """429 for a request every engine that could take it is full for; Retry-After from the soonest
        predicted drain of their queues (1 s without a prediction)."""
        drains = [(c.prediction.e2e_ms - c.prediction.idle_e2e_ms) / 1000 for c in full if c.prediction]
        config = self.settings.routing_for(full[0].variant.model)
        retry = min(max(math.ceil(min(drains)) if drains else 1, 1), config.max_retry_after_s)
        loads = ", ".join(f"{c.variant.id}: {c.load.in_flight}/{self.max_in_flight(c.variant.id)}" for c in full)
        return EnginesAtCapacity(f"every engine serving {what} is at its limit of requests in flight ({loads}); "
                                 f"retry in {retry} s", retry_after_s=retry)  # fmt: skip

    def _busy(self, variant_id: str) -> bool:
        gauges = self.load.gauges(variant_id)
        return self.in_flight[variant_id] > 0 or gauges.running + gauges.waiting > 0

    def max_in_flight(self, variant_id: str) -> int:
        """Requests the gateway admits to this variant's engine at once (its spec's, else the setting)."""
        spec = self.settings.remote_engines.get(variant_id)
        return (spec.max_in_flight if spec is not None else None) or self.settings.engine_max_in_flight

    def decide(self, model: LogicalModel, pinned: Variant | None, features: RequestFeatures
               ) -> tuple[Decision, dict[str, RawPrediction]]:  # fmt: skip
        candidates, raws = self.candidates(model, features)
        full = [c for c in candidates if c.serving and c.load.in_flight >= self.max_in_flight(c.variant.id)]
        full_ids = {c.variant.id for c in full}
        # Every request is an arrival of the model's concentrator, pinned ones too: they load the device as
        # routed ones do (unseen, a device carrying pinned traffic looked idle, and the rung chosen for that
        # trickle took the routed traffic when it came: loadtests/results/2026-12-06/router-h100-10a87e5.md).
        concentrator = self.concentrator(model.name)
        concentrator.arrive(features, time.monotonic())
        if pinned is not None:
            chosen = next(c for c in candidates if c.variant.id == pinned.id)
            if not (chosen.serving and pinned.servable):
                if pinned.withdrawn:
                    raise VariantNotServed(f"variant '{pinned.id}' is {pinned.state.value} and not served: "
                                           f"{pinned.reason or 'see GET /admin/models'}", param="model")  # fmt: skip
                raise EngineUnavailable(f"variant '{pinned.id}' is not being served yet "
                                        f"(state {pinned.state.value})",
                                        headers={"Retry-After": "5"})
            if pinned.id in full_ids:
                raise self._at_capacity(features, [chosen], f"variant '{pinned.id}'")
            return Decision(pinned, chosen.prediction, "pinned", "none"), raws
        admitted = [c for c in candidates if c.variant.id not in full_ids]
        admitted = self._mark_standby(concentrator, admitted)
        decision = self.router(model.name).route(features, admitted)
        if decision.variant is not None:
            return decision, raws
        if full:
            raise self._at_capacity(features, full, f"'{model.name}'")
        if decision.reason == "rejected":
            self.observations.rejected(model.name)
            raise NoVariantWithinBudget(
                f"no variant of '{model.name}' is predicted to meet the latency budget "
                f"({_describe(features.budget)}) at the current load; retry in {decision.retry_after_s} s",
                retry_after_s=decision.retry_after_s or 1,
            )  # fmt: skip
        states = {v.id: v.state for v in model.variants}
        raise EngineUnavailable(f"no engine is serving '{model.name}' yet (variants: {states})",
                                headers={"Retry-After": "5"})

    # --- the request path --------------------------------------------------------------------

    async def serve(self, request: ServeRequest, labels: RequestLabels, watch: Watch = unwatched
                    ) -> Answer | Streamed:  # fmt: skip
        """Route, then send. A GatewayError or ClientDisconnected propagates to the caller, which counts it
        under `labels` (`count`) and answers it."""
        return await self.send(self.route(request, labels), labels, watch)

    def route(self, request: ServeRequest, labels: RequestLabels) -> Plan:
        started = time.perf_counter()
        model, pinned = self.catalog.resolve(request.model)
        labels.model = model.name
        # vLLM's condition (vllm/renderers/online_renderer.py): tools with any tool_choice but "none" need a
        # parser; its 400 names engine flags a gateway user cannot set, so the gateway says why in its words.
        if model.tools_refused and request.upstream.get("tools") and request.upstream.get("tool_choice") != "none":
            raise InvalidRequest(model.tools_refused, param="tools", code="tools_unsupported")
        config = self.settings.routing_for(model.name)
        features = self.features(model.name, request, config)
        labels.tier = features.tier
        decision, raws = self.decide(model, pinned, features)
        labels.variant = decision.variant.id  # type: ignore[union-attr]
        self.metrics.decisions.labels(model.name, decision.variant.id, decision.reason).inc()  # type: ignore[union-attr]
        attempts = [(decision.variant, decision.prediction)]
        if pinned is None:
            attempts += [(c.variant, c.prediction) for c in decision.fallbacks]
        plan = Plan(request, model, features, decision, raws,
                    tuple(attempts[: config.max_attempts]), config.tier(features.tier).engine_priority,
                    started)  # type: ignore[arg-type]  # fmt: skip
        self.metrics.overhead.labels(request.endpoint).observe(time.perf_counter() - started)
        return plan

    async def send(self, plan: Plan, labels: RequestLabels, watch: Watch = unwatched) -> Answer | Streamed:
        """Each planned engine in turn until one answers: an engine that fails before the first byte
        has sent nothing to the client, so the next one may serve."""
        request, last_error = plan.request, None
        for variant, prediction in plan.attempts:
            engine = self.supervisor.get(variant.id)
            if engine is None or not engine.status().serving:
                continue
            if last_error is not None:
                self.metrics.retries.labels(plan.model.name, labels.variant).inc()
            labels.variant = variant.id
            call = Call(plan.model.name, request.endpoint, variant, plan.decision, plan.features.budget, prediction,
                        plan.raws.get(variant.id), plan.started, plan.features.tier)  # fmt: skip
            upstream = {**request.upstream, "model": variant.id}
            if plan.priority and engine.accepts_priority:
                upstream["priority"] = plan.priority
            headers = _headers(call, plan.features.tier)
            url = f"{engine.base_url}{request.path}"
            try:
                if request.stream:
                    return await self._stream(call, url, upstream, headers, engine.auth_headers,
                                              plan.features.prompt_tokens)  # fmt: skip
                return await self._complete(call, url, upstream, headers, watch, engine.auth_headers)
            except EngineUnavailable as exc:  # nothing reached the client yet: the next one may serve
                logger.warning("%s failed before the first byte: %s", variant.id, exc)
                last_error = exc
        raise last_error or EngineUnavailable(f"no engine is serving '{plan.model.name}' right now",
                                              headers={"Retry-After": "5"})

    def count(self, labels: RequestLabels, status: int) -> None:
        """A request that ended without an answer (an error, or the client gone)."""
        self.metrics.requests.labels(**labels.as_dict(), status=str(status)).inc()

    async def _complete(self, call: Call, url: str, body: dict[str, Any], headers: dict[str, str],
                        watch: Watch, auth: Mapping[str, str]) -> Answer:  # fmt: skip
        variant_id = call.variant.id
        device, seq = self._enter(call)
        try:
            data = await watch(self.engines.post_json(variant_id, url, body, auth))
        finally:
            self._leave(variant_id)
        self._record_usage(call, data.get("usage"))
        tokens = _completion_tokens(data.get("usage"))
        self.observations.record(call, Observed(time.perf_counter() - call.started, None, None, tokens,
                                                alone_to_end=self.admissions.alone(device, seq)))  # fmt: skip
        self.metrics.requests.labels(**call.request_labels, status="200").inc()
        data["service_tier"] = headers["x-quantgate-service-tier"]
        return Answer(data, headers)

    async def _stream(self, call: Call, url: str, body: dict[str, Any], headers: dict[str, str],
                      auth: Mapping[str, str], prompt_tokens: int) -> Streamed:  # fmt: skip
        # In flight from the moment it is sent: a burst routed before the engine answers must see it.
        device, seq = self._enter(call)
        prefilled = self._prefilling(call.variant.id, prompt_tokens)
        try:
            upstream = await self.engines.open_stream(call.variant.id, url, body, auth)
        except BaseException:
            prefilled()
            self._leave(call.variant.id)
            raise

        def on_close(timing: StreamTiming) -> None:
            prefilled()
            self._leave(call.variant.id)
            status = "200" if timing.completed else str(CLIENT_CLOSED)
            self.metrics.requests.labels(**call.request_labels, status=status).inc()
            itl = self.metrics.itl.labels(call.model, call.variant.id)
            for gap in timing.gaps:
                itl.observe(gap)
            self._record_usage(call, timing.usage)
            if timing.completed and timing.first_chunk is not None:
                tokens = _completion_tokens(timing.usage)
                tpot = sum(timing.gaps) / len(timing.gaps) if timing.gaps else None
                alone = self.admissions.alone
                self.observations.record(call, Observed(time.perf_counter() - call.started,
                                                        timing.first_chunk - call.started, tpot,
                                                        tokens or len(timing.gaps) or None,
                                                        alone(device, seq, timing.first_chunk),
                                                        alone(device, seq)))  # fmt: skip

        return Streamed(relay(upstream, StreamTiming(started=call.started, on_first=prefilled), on_close,
                              self.drain.cut),
                        {**headers, "cache-control": "no-cache"})

    def _enter(self, call: Call) -> tuple[str, int]:
        """Count the call in flight on its engine and admitted to its device: (device, admission number)."""
        variant_id = call.variant.id
        self.in_flight[variant_id] += 1
        self.metrics.in_flight.labels(variant_id).inc()
        device = call.raw.device if call.raw is not None else variant_id
        return device, self.admissions.admit(device, time.perf_counter())

    def _prefilling(self, variant_id: str, prompt_tokens: int) -> Callable[[], None]:
        """Count a stream as prefilling on its engine until the returned callable is first called (at its
        first chunk, or at its end if none came)."""
        self.prefilling[variant_id] += 1
        self.prefill_tokens[variant_id] += prompt_tokens
        done = False

        def prefilled() -> None:
            nonlocal done
            if not done:
                done = True
                self.prefilling[variant_id] -= 1
                self.prefill_tokens[variant_id] -= prompt_tokens

        return prefilled

    def _leave(self, variant_id: str) -> None:
        self.in_flight[variant_id] -= 1
        self.metrics.in_flight.labels(variant_id).dec()

    def _record_usage(self, call: Call, usage: dict | None) -> None:
        if not usage:
            return
        for kind in ("prompt_tokens", "completion_tokens"):
            if isinstance(usage.get(kind), int):
                self.metrics.tokens.labels(call.model, call.variant.id, kind.split("_")[0]).inc(usage[kind])


def _completion_tokens(usage: dict | None) -> int | None:
    value = (usage or {}).get("completion_tokens")
    return value if isinstance(value, int) else None


def _headers(call: Call, tier: str) -> dict[str, str]:
    headers = {
        "x-quantgate-variant": call.variant.id,
        "x-quantgate-budget": call.decision.budget_status,
        "x-quantgate-route": call.decision.reason,
        # As OpenAI does, the tier actually used: `auto` is served as `default`.
        "x-quantgate-service-tier": "default" if tier == "auto" else tier,
    }
    if call.prediction is not None:
        headers["x-quantgate-predicted-ms"] = str(round(call.prediction.e2e_ms))
        headers["x-quantgate-predicted-ttft-ms"] = str(round(call.prediction.ttft_ms))
    return headers


def _describe(budget: Budget) -> str:
    parts = [f"{name} <= {value:.0f} ms" for name, value in
             (("e2e", budget.e2e_ms), ("ttft", budget.ttft_ms), ("tpot", budget.tpot_ms)) if value is not None]
    return ", ".join(parts) or "none"
