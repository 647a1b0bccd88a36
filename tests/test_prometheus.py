"""deploy/: the Prometheus scrape config, the alert rules and the Grafana dashboard.

No Docker engine runs here, so the files are checked the way they can be: the
config and rules with promtool (Debian's ``prometheus`` package, which .ci/run
installs; the tests skip with the reason without it), each alert against its
unit test (deploy/prometheus/alerts_test.yml), the dashboard's structure, and
every metric name a query reads against the code that exports it. A real
Prometheus evaluating every query on a running stack is
``tests/test_metrics_processes.py::test_prometheus_answers_every_panel_and_alert_with_data``,
which uses the helpers below.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS_YML = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST_YML = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "userstream.json"
PROVISIONING = DEPLOY / "grafana" / "provisioning"
JOBS = ("api", "stream-worker", "train-worker")
# the Grafana variables a query may use, and what the tests put in their place
GRAFANA_VARIABLES = {"$__rate_interval": "20s"}
EXPORTERS = (ROOT / "stream" / "metrics.py", ROOT / "model" / "live" / "metrics.py",
             ROOT / "serving" / "metrics.py")  # fmt: skip
_PROBE = re.compile(r"^(?P<query>.+?)\s*(?P<op>>=|<=|==|!=|>|<)\s*(?P<number>-?[0-9.]+)\s*$", re.S)
_NAME = re.compile(r"\b(?:userstream|process)_[a-z0-9_]+\b")


# --- helpers (also used by tests/test_metrics_processes.py) ------------------------


def alert_rules() -> list[tuple[str, str]]:
    """(alert name, expression) of every rule in alerts.yml."""
    groups = yaml.safe_load(ALERTS_YML.read_text())["groups"]
    return [(r["alert"], " ".join(r["expr"].split())) for g in groups for r in g["rules"]]


def alert_probe(expr: str) -> str:
    """``query op number`` as ``query op bool number``: data whenever the query has data,
    firing or not.

    >>> alert_probe("max(x) > 120")
    'max(x) > bool 120'
    """
    m = _PROBE.match(expr)
    assert m, f"an alert must be `<query> <comparison> <number>`: {expr}"
    return f"{m['query']} {m['op']} bool {m['number']}"


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression with the Grafana variables filled in) of every target."""
    out = []
    for panel in _panels(json.loads(DASHBOARD.read_text())):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(var, value)
            out.append((panel["title"], expr))
    return out


def metric_names(expr: str) -> set[str]:
    """The userstream_* and process_* metric names an expression reads.

    >>> sorted(metric_names('sum(rate(userstream_a_total{x="userstream_b"}[1m]))'))
    ['userstream_a_total']
    """
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    return set(_NAME.findall(without_strings))


def write_test_config(folder: Path, ports: dict[str, int], interval: str = "1s") -> Path:
    """deploy's prometheus.yml with its jobs pointed at local ports, every ``interval``,
    and the deploy alert rules."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"] = {"scrape_interval": interval, "scrape_timeout": interval,
                        "evaluation_interval": interval}  # fmt: skip
    config["rule_files"] = [str(ALERTS_YML)]
    assert {j["job_name"] for j in config["scrape_configs"]} == set(ports)
    for job in config["scrape_configs"]:
        for key in [k for k in job if k.endswith("_sd_configs")]:
            del job[key]
        job["static_configs"] = [{"targets": [f"127.0.0.1:{ports[job['job_name']]}"]}]
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out += panel.get("panels", [])  # a collapsed row holds its panels
    return out


def _promtool(*args: str) -> subprocess.CompletedProcess:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is absent (Debian: apt-get install prometheus; .ci/run installs it)")
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=60, check=False)


# --- promtool ----------------------------------------------------------------------


def test_promtool_checks_the_scrape_config():
    run = _promtool("check", "config", str(PROMETHEUS_YML))
    assert run.returncode == 0, run.stdout + run.stderr
    jobs = [j["job_name"] for j in yaml.safe_load(PROMETHEUS_YML.read_text())["scrape_configs"]]
    assert sorted(jobs) == sorted(JOBS)


def test_promtool_checks_the_alert_rules():
    run = _promtool("check", "rules", str(ALERTS_YML))
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_alert_fires_in_its_promtool_unit_test():
    run = _promtool("test", "rules", str(ALERTS_TEST_YML))
    assert run.returncode == 0, run.stdout + run.stderr
    tests = yaml.safe_load(ALERTS_TEST_YML.read_text())["tests"]
    cases = [c for t in tests for c in t.get("alert_rule_test", [])]
    fired = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    names = {name for name, _ in alert_rules()}
    assert fired == names, f"alerts without a firing case: {sorted(names - fired)}"
    assert quiet == names, f"alerts without a quiet case: {sorted(names - quiet)}"


def test_the_issue_asks_for_these_alerts():
    exprs = " ".join(expr for _, expr in alert_rules())
    for metric in ("userstream_stream_consumer_lag_seconds", "userstream_embedding_freshness",
                   'up{job="train-worker"}', "userstream_train_heartbeat_timestamp_seconds",
                   "userstream_stream_dead_letters_total"):  # fmt: skip
        assert metric in exprs, metric
    for _, expr in alert_rules():
        alert_probe(expr)  # each has the form the integration test evaluates


# --- the dashboard -------------------------------------------------------------------

_PANEL_TYPES = {"row", "timeseries", "stat", "gauge", "bargauge", "table"}


def test_the_dashboard_is_a_well_formed_grafana_dashboard():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "userstream" and dash["title"] and dash["schemaVersion"] >= 36
    datasource = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    panels = _panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for p in panels:
        assert p["type"] in _PANEL_TYPES, p["type"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] >= 1, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}  # fmt: skip
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": uid}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"]["uid"] == uid, p["title"]
            variables = set(re.findall(r"\$\w+", t["expr"]))
            assert variables <= set(GRAFANA_VARIABLES), (p["title"], variables)
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]


def test_the_dashboard_has_the_panels_the_issue_asks_for():
    titles = {p["title"] for p in _panels(json.loads(DASHBOARD.read_text()))}
    for title in ("Ingest rate", "Consumer lag (events)", "Consumer lag (seconds)",
                  "Dead letters by reason", "Embedding freshness", "Training cycle time",
                  "Loss per task", "Model version", "Index size", "API latency by route",
                  "API error rate"):  # fmt: skip
        assert title in titles, title
    exprs = " ".join(e for _, e in dashboard_queries())
    assert "histogram_quantile(0.5, sum by (le) (rate(userstream_embedding_freshness" in exprs
    assert "histogram_quantile(0.99, sum by (le) (rate(userstream_embedding_freshness" in exprs


def test_every_queried_metric_is_exported_by_the_code():
    source = "\n".join(p.read_text() for p in EXPORTERS)
    exprs = [e for _, e in dashboard_queries()] + [e for _, e in alert_rules()]
    for name in sorted({n for e in exprs for n in metric_names(e)}):
        if name.startswith("process_"):
            continue  # prometheus_client's ProcessCollector
        base = re.sub(r"_(total|bucket|count|sum)$", "", name)
        assert f'"{base}"' in source, f"{name}: no exporter defines it"


def test_grafana_provisioning_matches_the_compose_mounts():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    grafana, prometheus = compose["services"]["grafana"], compose["services"]["prometheus"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "userstream.yml").read_text())
    assert mounts["./deploy/grafana/dashboards"] == provider["providers"][0]["options"]["path"]
    source = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    prom_mounts = dict(v.split(":")[:2] for v in prometheus["volumes"] if v.startswith("./"))
    assert prom_mounts["./deploy/prometheus"] == "/etc/prometheus"
    for job in yaml.safe_load(PROMETHEUS_YML.read_text())["scrape_configs"]:
        for sd in job["dns_sd_configs"]:
            for name in sd["names"]:
                assert name in compose["services"], f"{job['job_name']} scrapes unknown {name}"
