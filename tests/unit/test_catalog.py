from __future__ import annotations

import pytest

from server.catalog import Catalog, Variant, split_model_name
from server.errors import ModelNotFound
from server.routing.config import RoutingConfig
from server.routing.router import Router
from server.routing.types import Budget, Candidate, RequestFeatures


def _catalog() -> Catalog:
    catalog = Catalog()
    for variant in (
        Variant("m", "int4-gptq", "int4-gptq", 4, ppl_delta=0.2),
        Variant("m", "bf16", "base", 16),
        Variant("m", "int8", "int8", 8, ppl_delta=0.015),
        Variant("m", "new", "awq", 4),
    ):
        catalog.add_variant(variant, created=0)
    return catalog


@pytest.mark.parametrize(("name", "expected"), [("m", ("m", None)), ("m@int8", ("m", "int8")), ("m@", ("m", ""))])
def test_split_model_name(name: str, expected: tuple) -> None:
    assert split_model_name(name) == expected


def test_accuracy_order_base_then_measured_then_unmeasured() -> None:
    model, _ = _catalog().resolve("m")
    assert [v.name for v in model.accuracy_order()] == ["bf16", "int8", "int4-gptq", "new"]


def test_resolve_pinned_variant() -> None:
    _, variant = _catalog().resolve("m@int8")
    assert variant is not None and variant.id == "m@int8"


@pytest.mark.parametrize("name", ["x", "x@bf16", "m@int3"])
def test_unknown_model_or_variant(name: str) -> None:
    with pytest.raises(ModelNotFound) as info:
        _catalog().resolve(name)
    assert info.value.status_code == 404


@pytest.mark.parametrize(
    ("serving", "expected"),
    [({"m@bf16", "m@int8"}, "m@bf16"), ({"m@int4-gptq", "m@int8"}, "m@int8"), (set(), None)],
)
def test_choose_most_accurate_serving(serving: set, expected: str | None) -> None:
    # Without a budget the router picks the most accurate variant whose engine serves.
    model, _ = _catalog().resolve("m")
    candidates = [Candidate(v, v.id in serving) for v in model.variants]
    decision = Router(RoutingConfig()).route(RequestFeatures(16, 16, Budget()), candidates)
    assert (decision.variant.id if decision.variant else None) == expected


def test_re_adding_a_variant_replaces_it() -> None:
    catalog = _catalog()
    catalog.add_variant(Variant("m", "int8", "int8", 8, ppl_delta=0.01), created=0)
    model, _ = catalog.resolve("m")
    assert [v.ppl_delta for v in model.variants if v.name == "int8"] == [0.01]


def test_a_record_s_measures_reach_the_catalog_view() -> None:
    from server.registry.store import VariantRecord, VariantState

    record = VariantRecord(
        id="m@int8", model="m", name="int8", method="int8", bits=8, config={}, artifact_key=None, model_path=None,
        engine_args=(), state=VariantState.READY, reason=None, size_bytes=10, seconds_to_make=1.0, ppl=15.0,
        ppl_delta=0.036, sanity="Paris", log_path=None, attempts=1, created_at=0, updated_at=0,
        chat={"answers": [], "correct": 42, "loops": 2, "prompts": 49}, next_token={"kld": 0.023, "top1": 0.916})
    variant = Variant.from_record(record)
    assert (variant.kld, variant.top1_agreement) == (0.023, 0.916)
    assert variant.chat_score == pytest.approx(42 / 49)
    unmeasured = Variant.from_record(VariantRecord(**{**record.__dict__, "chat": None, "next_token": None}))
    assert (unmeasured.kld, unmeasured.top1_agreement, unmeasured.chat_score) == (None, None, None)
