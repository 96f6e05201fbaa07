"""Writes the JSON schemas CI validates quantgate's custom resources against (ServiceMonitor,
PrometheusRule, KEDA ScaledObject), from the typed models that cloudcoil generates from the
upstream CRDs. Run it in a throwaway environment when moving to a newer operator version:

    python -m venv /tmp/crd-schemas
    /tmp/crd-schemas/bin/pip install cloudcoil-models-prometheus-operator==0.93.1.1 cloudcoil-models-keda==2.20.2.1
    /tmp/crd-schemas/bin/python k8s/schemas/generate.py

Objects are closed (`additionalProperties: false` wherever the CRD lists properties), which is what
`kubectl apply --validate=strict` does with an unknown field: a typo fails instead of being dropped.
"""

from __future__ import annotations

import json
from pathlib import Path

from cloudcoil.models.keda import v1alpha1 as keda
from cloudcoil.models.prometheus_operator import v1 as prometheus_operator

OUT = Path(__file__).parent
MODELS = {
    "servicemonitor-monitoring.coreos.com-v1.json": prometheus_operator.ServiceMonitor,
    "prometheusrule-monitoring.coreos.com-v1.json": prometheus_operator.PrometheusRule,
    "scaledobject-keda.sh-v1alpha1.json": keda.ScaledObject,
}


def closed(node: object) -> object:
    if isinstance(node, dict):
        node = {key: closed(value) for key, value in node.items()}
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [closed(item) for item in node]
    return node


def schema(model: type) -> dict:
    generated = closed(model.model_json_schema(by_alias=True, mode="validation"))
    api_version = f"{model.__module__.split('.')[-1]}"
    generated["$schema"] = "http://json-schema.org/draft-07/schema#"
    generated["description"] = f"{model.__name__} ({api_version}), from {model.__module__}"
    return generated


if __name__ == "__main__":
    for name, model in MODELS.items():
        (OUT / name).write_text(json.dumps(schema(model), indent=1, sort_keys=True) + "\n")
        print("wrote", OUT / name)
