"""deploy/: Prometheus config and rules pass promtool (and the rules' own unit tests), the YAML passes
yamllint, the Dockerfiles pass hadolint and install the way README.md does, the compose file
points at files that exist, and the dashboard JSON is what its generator writes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from tests.ops.conftest import REPO, load_script, run, tool

DEPLOY = REPO / "deploy"
RULES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))


def test_promtool_checks_the_config(promtool: str, tmp_path: Path) -> None:
    # The config globs /etc/prometheus/rules/ (the compose mount); point it at the repository's files.
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["rule_files"] = [str(DEPLOY / "prometheus" / "rules" / "*.yml")]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = run(promtool, "check", "config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(RULES)} rule files found" in result.stdout


def test_promtool_checks_the_rules(promtool: str) -> None:
    result = run(promtool, "check", "rules", *map(str, RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(re.findall(r"SUCCESS: \d+ rules found", result.stdout)) == len(RULES)


def test_alerts_fire_as_their_unit_tests_say(promtool: str) -> None:
    result = run(promtool, "test", "rules", str(DEPLOY / "prometheus" / "tests" / "quantgate-rules.test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alerts_cover_what_operators_page_on() -> None:
    alerts = {rule["alert"]: rule for path in RULES for group in yaml.safe_load(path.read_text())["groups"]
              for rule in group["rules"] if "alert" in rule}  # fmt: skip
    needed = {"QuantgateBudgetBurnRateFast", "QuantgateBudgetBurnRateSlow", "QuantgateEngineDown",
              "QuantgateKVCacheSaturated", "QuantgateHighErrorRate", "QuantgateQualityGateRejection"}  # fmt: skip
    assert needed <= set(alerts)
    for rule in alerts.values():
        assert rule["labels"]["severity"] in {"page", "ticket", "warning", "info"}
        assert rule["annotations"]["summary"]


def test_yamllint_passes_on_deploy_and_k8s() -> None:
    result = run(tool("yamllint"), "-c", ".yamllint.yaml", "--strict", "deploy", "k8s", ".yamllint.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_passes_on_the_dockerfiles() -> None:
    dockerfiles = sorted((DEPLOY / "docker").glob("Dockerfile.*"))
    assert [p.name for p in dockerfiles] == ["Dockerfile.cpu", "Dockerfile.cuda"]
    result = run(tool("hadolint"), "--config", str(DEPLOY / "docker" / "hadolint.yaml"), *map(str, dockerfiles))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfiles_install_the_way_the_readme_does() -> None:
    readme = (REPO / "README.md").read_text()
    assert "make serve" in readme and "make test" in readme
    for path in sorted((DEPLOY / "docker").glob("Dockerfile.*")):
        text = path.read_text()
        assert re.search(r"^RUN make install\b", text, re.MULTILINE), path.name  # the Makefile is the one recipe
        copied = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.MULTILINE)
        for line in copied:
            for source in line.split():
                assert (REPO / source).exists(), f"{path.name} copies {source}, which does not exist"
        assert 'CMD ["serve"]' in text and 'ENTRYPOINT ["quantgate"]' in text


def test_compose_mounts_and_builds_files_that_exist() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert set(compose["services"]) == {"gateway", "prometheus", "grafana"}
    build = compose["services"]["gateway"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
            else:
                assert source in compose["volumes"], source
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert targets == {"gateway:8000"}  # the compose service name and the gateway's port
    assert {job["metrics_path"] for job in prometheus["scrape_configs"]} == {"/metrics", "/metrics/engines"}


def test_dashboard_json_is_what_its_generator_writes() -> None:
    module = load_script(DEPLOY / "grafana" / "dashboard.py")
    committed = json.loads((DEPLOY / "grafana" / "dashboards" / "quantgate.json").read_text())
    assert committed == module.dashboard(), "run `python deploy/grafana/dashboard.py`"
    titles = [p["title"] for p in committed["panels"] if p["type"] != "row"]
    assert len(titles) == len(set(titles))
    for needed in ("Memory per variant", "Time to first token", "Inter-token latency", "End-to-end latency",
                   "Budget attainment", "Routing mix", "Queue", "KV cache usage", "Requests and errors"):
        assert needed in titles
    provisioning = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "quantgate.yml").read_text())
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = dict(v.split(":")[:2][::-1] for v in compose["services"]["grafana"]["volumes"] if v.startswith("."))
    assert mounts[provisioning["providers"][0]["options"]["path"]] == "./grafana/dashboards"
