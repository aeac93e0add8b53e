"""The Grafana dashboard (deploy/grafana) names only metrics and labels the code exports.

The exported names come from the code's own Prometheus registries, instantiated: the router's
RouterMetrics and a node's NodeMetrics, which are what `/metrics` on the router and a node's
--metrics-port serve.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from pdserve.node.server import NodeMetrics
from pdserve.router.metrics import RouterMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "pdserve-dashboard.json"
# The sample names a family of each type exposes (prometheus_client's text format).
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",),
            "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("", "_sum", "_count", "_created")}
# Labels Prometheus adds to every scraped series, and the histogram bucket label.
SCRAPE_LABELS = {"instance", "job", "le"}
# Each of the views must have at least one panel reading one of these metrics.
REQUIRED_VIEWS = {
    "TTFT": "pdserve_router_time_to_first_token_seconds_bucket",
    "TPOT/ITL": "pdserve_router_inter_token_latency_seconds_bucket",
    "E2E": "pdserve_router_e2e_request_latency_seconds_bucket",
    "requests by status": "pdserve_router_requests_total",
    "KV usage": "pdserve_node_free_blocks",
    "KV transfer": "pdserve_kv_transfer_bytes_total",
    "speculative acceptance": "pdserve_spec_accepted_tokens_total",
}


def _registry_names(registry: CollectorRegistry) -> dict[str, set[str]]:
    """Exported sample name -> the labels its family carries."""
    # A labelled metric with no child yet has no samples, so its label names are read from the
    # metric object (prometheus_client keeps them in _labelnames).
    labels = {name: set(getattr(collector, "_labelnames", ()))
              for collector, names in registry._collector_to_names.items() for name in names}
    return {family.name + suffix: labels.get(family.name, set())
            for family in registry.collect() for suffix in SUFFIXES[family.type]}


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    names = _registry_names(RouterMetrics().registry)
    for role in ("prefill", "decode", "mixed"):
        names.update(_registry_names(NodeMetrics(role).registry))
    return names


def _exprs() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def test_the_registries_export_what_the_dashboard_reads(exported: dict[str, set[str]]) -> None:
    # a check of the check: the collection sees labelled metrics that have no sample yet
    assert exported["pdserve_router_requests_total"] == {"status"}
    assert exported["pdserve_kv_transfer_bytes_total"] == {"direction", "transport"}


def test_every_panel_names_exported_metrics_and_labels(exported: dict[str, set[str]]) -> None:
    exprs = _exprs()
    assert exprs, "the dashboard has no queries"
    for title, expr in exprs:
        metrics = re.findall(r"\b(pdserve_[a-z0-9_]+)", expr)
        assert metrics, f"panel {title!r} reads no pdserve metric: {expr}"
        for name in metrics:
            assert name in exported, f"panel {title!r} names {name}, which the code does not export"
        known = set().union(*(exported[m] for m in metrics)) | SCRAPE_LABELS
        used = set(re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr))
        used = {label.strip() for group in used for label in group.split(",") if label.strip()}
        used |= set(re.findall(r"([a-z_]+)\s*(?:=~|!=|!~|=)\s*\"", expr))
        assert used <= known, f"panel {title!r} uses labels {sorted(used - known)} that {metrics} lack"


def test_the_dashboard_covers_every_view() -> None:
    text = " ".join(expr for _, expr in _exprs())
    missing = [view for view, metric in REQUIRED_VIEWS.items() if metric not in text]
    assert not missing, f"no panel for {missing}"


def test_a_misspelt_metric_would_be_caught(exported: dict[str, set[str]]) -> None:
    assert "pdserve_router_time_to_first_token_seconds_bucket" in exported
    assert "pdserve_router_ttft_seconds_bucket" not in exported
    assert "pdserve_node_requests" not in exported  # a counter is read as ..._total
