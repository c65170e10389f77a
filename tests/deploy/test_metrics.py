"""The autoscaler's inputs exist: the series the prometheus-adapter rule reads are exported by a real
Triton (the session's embedded server) for the served model, and the rule's query is their ratio."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import yaml

ADAPTER_VALUES = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "prometheus-adapter" / "values.yaml"


def test_adapter_rule_reads_series_that_triton_exports(triton_server) -> None:
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    used = set(re.findall(r"\bnv_[a-z_]+", rule["seriesQuery"] + rule["metricsQuery"]))
    assert used == {"nv_inference_queue_duration_us", "nv_inference_request_success"}
    with urllib.request.urlopen(triton_server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    for name in used:
        assert re.search(rf'^{name}\{{[^}}]*model="{triton_server.model_name}"', text, re.MULTILINE), name
        assert f"# TYPE {name} counter" in text  # counters: the rule must rate() them, as it does
    assert rule["metricsQuery"].count("rate(") == 2
