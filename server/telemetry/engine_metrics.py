"""Re-export the engines' own metrics (`vllm:*`) with a `variant` label, on GET /metrics/engines.

On Kubernetes a NetworkPolicy lets only the gateway reach the engines (vLLM's admin paths must not
be reachable from outside), so Prometheus cannot scrape them directly; locally they listen on the
loopback. The gateway already scrapes every engine each second for routing; this serves the last
page of each, merged family by family (one HELP/TYPE per family, as the text format requires), with
`variant="model@variant"` on every sample so dashboards can join them with `quantgate_*`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

logger = logging.getLogger(__name__)
VARIANT_LABEL = "variant"


def merge_pages(pages: dict[str, bytes]) -> tuple[list[Metric], dict[str, bool]]:
    """Families from every engine's page, each sample labelled with its variant; and which pages parsed."""
    families: dict[str, Metric] = {}
    parsed: dict[str, bool] = {}
    for variant_id, page in sorted(pages.items()):
        try:
            incoming = list(text_string_to_metric_families(page.decode("utf-8", "replace")))
        except ValueError as exc:
            logger.warning("the metrics page of %s does not parse: %s", variant_id, exc)
            parsed[variant_id] = False
            continue
        parsed[variant_id] = True
        for family in incoming:
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            elif merged.type != family.type:
                continue  # two engine versions disagree on a family's type: keep the first one's
            for sample in family.samples:
                labels = {**sample.labels, VARIANT_LABEL: variant_id}
                merged.samples.append(Sample(sample.name, labels, sample.value, sample.timestamp, sample.exemplar))
    return list(families.values()), parsed


class _Pages(Collector):
    def __init__(self, families: Iterable[Metric], parsed: dict[str, bool]) -> None:
        self._families = list(families)
        self._parsed = parsed

    def collect(self):
        ok = GaugeMetricFamily("quantgate_engine_metrics_parsed",
                               "1 when the engine's last /metrics page was fresh and parsed", labels=["variant"])
        for variant_id, good in self._parsed.items():
            ok.add_metric([variant_id], float(good))
        yield ok
        yield from self._families


def render(pages: dict[str, bytes]) -> bytes:
    families, parsed = merge_pages(pages)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Pages(families, parsed))
    return generate_latest(registry)
