"""Prometheus and Grafana files: promtool accepts them, and every metric and label that the dashboard, the
alerts and the queue-depth autoscaler read is one the running service exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.files import (
    DASHBOARD,
    GRAFANA_DIR,
    K8S,
    PROMETHEUS_DIR,
    TARGET_LABELS,
    adapter_rules,
    alert_queries,
    dashboard_queries,
    label_names,
    metric_names,
    yaml_doc,
)
from tests.deploy.processes import ServiceProcess, get, post_json


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (scripts/test installs Debian's prometheus package for it)")
    return path


def _adapter_queries() -> list[str]:
    """The adapter rules' queries, with the adapter's templates filled in as it would for one pod."""
    queries = []
    for rule in adapter_rules():
        queries.append(rule["seriesQuery"])
        queries.append(
            rule["metricsQuery"]
            .replace("<<.Series>>", rule["name"]["as"])
            .replace("<<.LabelMatchers>>", 'namespace="digit",pod="digit-api-0"')
            .replace("<<.GroupBy>>", "pod")
        )
    return queries


def _hpa_metric_names() -> set[str]:
    hpa = yaml_doc(K8S / "components" / "queue-depth" / "hpa-queue-depth.yaml")
    return {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}


def test_promtool_accepts_the_prometheus_config_and_its_rules() -> None:
    result = subprocess.run(
        [_promtool(), "check", "config", str(PROMETHEUS_DIR / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


def _rejection_alert_fires(tmp_path: Path, v1_per_s: float, v2_per_s: float, rejected_per_s: float) -> bool:
    """Whether DigitServiceRejectingRequests fires after 15 minutes of this traffic (`promtool test rules`)."""
    every_minute = {"v1": v1_per_s * 60, "v2": v2_per_s * 60, "rejected": rejected_per_s * 60}
    series = {
        'digit_http_requests_total{route="/v1/predict/image", method="POST", status="200"}': every_minute["v1"],
        'digit_http_requests_total{route="/v2/models/{name}/infer", method="POST", status="200"}': every_minute["v2"],
        'digit_rejected_requests_total{reason="queue_delay"}': every_minute["rejected"],
    }
    rule = next(
        rule
        for group in yaml_doc(PROMETHEUS_DIR / "alerts.yml")["groups"]
        for rule in group["rules"]
        if rule.get("alert") == "DigitServiceRejectingRequests"
    )
    firing = {"exp_alerts": [{"exp_labels": rule["labels"], "exp_annotations": rule["annotations"]}]}
    for expect_firing in (True, False):
        test = {
            "rule_files": [str(PROMETHEUS_DIR / "alerts.yml")],
            "evaluation_interval": "1m",
            "tests": [
                {
                    "interval": "1m",
                    "input_series": [{"series": name, "values": f"0+{step:g}x20"} for name, step in series.items()],
                    "alert_rule_test": [
                        {
                            "eval_time": "15m",
                            "alertname": "DigitServiceRejectingRequests",
                            **(firing if expect_firing else {}),
                        }
                    ],
                }
            ],
        }
        path = tmp_path / "rejections.test.yml"
        path.write_text(yaml.safe_dump(test))
        result = subprocess.run(
            [_promtool(), "test", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
        )
        if result.returncode == 0:
            return expect_firing
    raise AssertionError(f"promtool could not decide: {result.stdout}{result.stderr}")


def test_alerts_and_dashboard_count_the_same_prediction_routes() -> None:
    """A panel and an alert of the same name must not disagree about which requests are predictions."""
    routes = {
        match for query in [*alert_queries(), *dashboard_queries()] for match in re.findall(r'route=~"([^"]*)"', query)
    }
    assert routes == {"/v1/predict.*|/v2/models/.*/infer"}


def test_the_rejection_alert_counts_protocol_v2_predictions_too(tmp_path: Path) -> None:
    # 0.5 rejections/s among 11 predictions/s (most of them /v2 infer calls) is 4.5 %: no alert.
    assert not _rejection_alert_fires(tmp_path, v1_per_s=1, v2_per_s=10, rejected_per_s=0.5)
    # 1.1 of 11/s is 10 %: the alert fires.
    assert _rejection_alert_fires(tmp_path, v1_per_s=1, v2_per_s=10, rejected_per_s=1.1)


def test_promtool_parses_every_dashboard_and_adapter_query(tmp_path: Path) -> None:
    # promtool has no bare query checker; recording rules make it parse each query as PromQL.
    queries = [q.replace("$__rate_interval", "1m") for q in dashboard_queries()] + _adapter_queries()
    rules = {
        "groups": [{"name": "queries", "rules": [{"record": f"query:{i}", "expr": q} for i, q in enumerate(queries)]}]
    }
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    result = subprocess.run([_promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [key for key, _ in pairs]
    assert len(keys) == len(set(keys)), f"a key given twice (Grafana keeps the last): {keys}"
    return dict(pairs)


def test_dashboard_shows_what_operators_need() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys)
    queries = "\n".join(dashboard_queries())
    for needed in (
        "rate(digit_http_requests_total",  # request rate
        "histogram_quantile(0.5, sum by (le) (rate(digit_http_request_duration_seconds_bucket",  # p50
        "histogram_quantile(0.99, sum by (le) (rate(digit_http_request_duration_seconds_bucket",  # p99
        "digit_batch_size_",
        "digit_queue_depth",
        "digit_event_loop_lag_seconds",
        "digit_rejected_requests_total",
        "sum by (digit) (rate(digit_predictions_total",
    ):
        assert needed in queries, needed
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    (variable,) = dashboard["templating"]["list"]
    datasource = yaml_doc(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    assert variable["type"] == "datasource" and variable["current"]["value"] == datasource["uid"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


@pytest.fixture(scope="module")
def exported(kubernetes_api: ServiceProcess) -> dict[str, set[str]]:
    """Sample name -> label names, scraped from the running service after one prediction."""
    status, _ = post_json(f"{kubernetes_api.url}/v1/predict", {"pixels": [0.0] * 784})
    assert status == 200
    status, body = get(f"{kubernetes_api.url}/metrics")
    assert status == 200
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


def _check_queries(queries: list[str], exported: dict[str, set[str]]) -> None:
    for query in queries:
        names = metric_names(query)
        missing = names - exported.keys()
        assert not missing, f"{query}\n  reads {sorted(missing)}, which the service does not export"
        known_labels = set().union(*(exported[name] for name in names)) | {"le"} | TARGET_LABELS
        unknown = label_names(query) - known_labels
        assert not unknown, f"{query}\n  uses labels {sorted(unknown)} that its metrics do not have"


def test_dashboard_reads_only_exported_metrics(exported: dict[str, set[str]]) -> None:
    queries = dashboard_queries()
    assert queries
    _check_queries(queries, exported)


def test_alerts_read_only_exported_metrics(exported: dict[str, set[str]]) -> None:
    queries = alert_queries()
    assert queries
    _check_queries(queries, exported)


def test_queue_depth_autoscaling_reads_an_exported_gauge(exported: dict[str, set[str]]) -> None:
    assert _hpa_metric_names() == {"digit_queue_depth"}
    assert _hpa_metric_names() <= exported.keys()
    _check_queries(_adapter_queries(), exported)


def test_the_checks_see_the_histogram_suffixes(exported: dict[str, set[str]]) -> None:
    # A bare histogram or counter name is no series in Prometheus: queries must use the exported sample names.
    assert "digit_http_request_duration_seconds_bucket" in exported
    assert "digit_http_request_duration_seconds" not in exported
    assert "digit_http_requests_total" in exported
    assert "digit_http_requests" not in exported
    assert metric_names("histogram_quantile(0.5, sum by (le) (rate(digit_batch_size_bucket[1m])))") == {
        "digit_batch_size_bucket"
    }
    assert label_names('sum by (route, status) (rate(digit_http_requests_total{route=~"/v1/.*"}[1m]))') == {
        "route",
        "status",
    }
