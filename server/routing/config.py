"""Routing configuration: one RoutingConfig per model (a gateway-wide default plus per-model
overrides in the settings), with per-tier defaults and overrides."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from server.routing.concentrate import SharedDeviceConfig
from server.routing.plugins import build, build_scorer
from server.routing.types import Budget, Tier

Policy = Literal["degrade", "reject"]


class ScorerSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    weight: float = Field(ge=0.0, le=100.0)
    parameters: dict[str, Any] = Field(default_factory=dict)


class PluginSpec(BaseModel):
    """A filter or picker of the registry (server/routing/plugins.py) and its parameters; a bare name
    stands for one with its defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    parameters: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


def _specs(*names: str) -> tuple[PluginSpec, ...]:
    return tuple(PluginSpec(name=n) for n in names)


class FilterStages(BaseModel):
    """The router's three filter stages (server/routing/router.py), each a list of filters run in order:
    `eligible`: a candidate must pass every one, and none left answers "no variant" (`healthy` is
    required here); `preferred`: none left keeps every eligible one; `fitting`: none left applies the
    tier's policy (degrade to the fastest preferred, or reject with Retry-After)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    eligible: tuple[PluginSpec, ...] = Field(_specs("healthy", "quality-floor"), max_length=16)
    preferred: tuple[PluginSpec, ...] = Field(_specs("shared-device"), max_length=16)
    fitting: tuple[PluginSpec, ...] = Field(_specs("within-budget"), max_length=16)

    @model_validator(mode="after")
    def _healthy_first(self) -> FilterStages:
        if not any(spec.name == "healthy" for spec in self.eligible):
            raise ValueError("filters.eligible must include 'healthy': without it requests reach engines that are down")
        return self


class TierConfig(BaseModel):
    """How one `service_tier` is served: a default budget when the request sets none, the
    engine-side priority (vLLM: lower runs earlier), and optional policy and scorer overrides."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    budget_e2e_ms: float | None = Field(None, gt=0, le=3_600_000)
    budget_ttft_ms: float | None = Field(None, gt=0, le=3_600_000)
    budget_tpot_ms: float | None = Field(None, gt=0, le=60_000)
    engine_priority: int = Field(0, ge=-1000, le=1000)
    policy: Policy | None = None
    scorers: dict[str, ScorerSpec] | None = None

    def default_budget(self) -> Budget:
        budget = Budget(self.budget_e2e_ms, self.budget_ttft_ms, self.budget_tpot_ms, source="tier")
        return budget if budget.any else Budget()


def _default_scorers() -> dict[str, ScorerSpec]:
    # Quality dominates: among variants predicted to meet the budget the most accurate wins;
    # headroom and load break near-ties (int8 at +1.5 % ppl vs the base).
    return {"quality": ScorerSpec(weight=1.0), "headroom": ScorerSpec(weight=0.1), "load": ScorerSpec(weight=0.1)}


DEFAULT_TIERS: dict[str, TierConfig] = {
    "priority": TierConfig(budget_ttft_ms=1000, engine_priority=-10),
    "default": TierConfig(),
    "auto": TierConfig(),
    # The cheapest variant within the quality floor, scheduled after everything else.
    "flex": TierConfig(engine_priority=10, scorers={"cost": ScorerSpec(weight=1.0),
                                                    "quality": ScorerSpec(weight=0.01)}),
}  # fmt: skip


class RoutingConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    policy: Policy = Field("degrade", description="when no variant is predicted to meet the budget")
    quality_floor: float | None = Field(None, ge=0.0, le=100.0, description="max ppl delta a routed request gets")
    scorers: dict[str, ScorerSpec] = Field(default_factory=_default_scorers)
    tiers: dict[Tier, TierConfig] = Field(default_factory=lambda: dict(DEFAULT_TIERS))
    output_tokens_quantile: float = Field(0.9, gt=0.0, le=1.0)
    default_output_tokens: int = Field(128, ge=1, le=1_048_576, description="until completions are observed")
    max_attempts: int = Field(2, ge=1, le=5, description="engines tried before any byte reaches the client")
    max_retry_after_s: int = Field(60, ge=1, le=60)
    shared_device: SharedDeviceConfig = Field(default_factory=SharedDeviceConfig)
    filters: FilterStages = Field(default_factory=FilterStages)
    picker: PluginSpec = Field(default_factory=lambda: PluginSpec(name="max-score"))

    @field_validator("tiers", mode="before")
    @classmethod
    def _fill_tiers(cls, tiers: Any) -> Any:
        """A tier given in the config changes only the fields it sets of that tier's defaults."""
        if not isinstance(tiers, dict):
            return tiers
        merged: dict[str, Any] = dict(DEFAULT_TIERS)
        for name, given in tiers.items():
            default = DEFAULT_TIERS.get(name, TierConfig())
            if isinstance(given, dict):
                merged[name] = {**default.model_dump(exclude_unset=True), **given}
            else:
                merged[name] = given
        return merged

    @model_validator(mode="after")
    def _scorers_exist(self) -> RoutingConfig:
        for where, scorers in [("scorers", self.scorers)] + [(f"tiers.{t}.scorers", c.scorers)
                                                            for t, c in self.tiers.items()]:  # fmt: skip
            if scorers is None:
                continue
            if not any(spec.weight > 0 for spec in scorers.values()):
                raise ValueError(f"{where}: at least one scorer needs a weight above 0")
            for name, spec in scorers.items():
                try:
                    build_scorer(name, spec.parameters)
                except (ValueError, ValidationError) as exc:
                    raise ValueError(f"{where}.{name}: {exc}") from None
        return self

    @model_validator(mode="after")
    def _filters_and_picker_exist(self) -> RoutingConfig:
        stages = {stage: getattr(self.filters, stage) for stage in ("eligible", "preferred", "fitting")}
        for stage, specs in stages.items():
            for spec in specs:
                try:
                    build("filter", spec.name, self.filter_parameters(spec))
                except (ValueError, ValidationError) as exc:
                    raise ValueError(f"filters.{stage}.{spec.name}: {exc}") from None
        try:
            build("picker", self.picker.name, self.picker.parameters)
        except (ValueError, ValidationError) as exc:
            raise ValueError(f"picker.{self.picker.name}: {exc}") from None
        return self

    def filter_parameters(self, spec: PluginSpec) -> dict[str, Any]:
        """A filter's parameters: its spec's, over the ones older fields of this config set for it
        (`quality_floor` for quality-floor, `shared_device.spill_max_overlap` for shared-device)."""
        inherited: dict[str, Any] = {
            "quality-floor": {"max_ppl_delta": self.quality_floor},
            "shared-device": {"spill_max_overlap": self.shared_device.spill_max_overlap},
        }.get(spec.name, {})
        return {**inherited, **spec.parameters}

    def tier(self, tier: str) -> TierConfig:
        return self.tiers.get(tier) or self.tiers["default"]  # type: ignore[index]

    def budget(self, own: Budget, tier: str, stream: bool) -> Budget:
        """The budget a request is routed on, the one place it is built: the request's own (its headers
        and `latency_budget_ms`, parsed by server/api/features.py), else its tier's default. Unstreamed,
        the first token reaches the client with the last, so a TTFT bound bounds the whole answer."""
        budget = own if own.any else self.tier(tier).default_budget()
        if not stream and budget.ttft_ms is not None:
            e2e = min(budget.ttft_ms, budget.e2e_ms or budget.ttft_ms)
            budget = Budget(e2e, None, budget.tpot_ms, budget.source)
        return budget

    def policy_for(self, tier: str) -> Policy:
        return self.tier(tier).policy or self.policy

    def scorers_for(self, tier: str) -> dict[str, ScorerSpec]:
        return self.tier(tier).scorers or self.scorers
