"""Per-replica figures on the ingress's /metrics, from the replicas' reports on the ReplicaBoard.

The ingress's own metrics (HTTP requests, request latencies, tokens, outcomes) are measured where the requests pass,
in the ingress, so they cover every replica; `llm_requests_running`/`_waiting`/`llm_batch_size` are the sums over the
replicas. The families below add each replica's own figures, labelled by replica id.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from serving.remote_engine import RemoteEngine

SNAPSHOT_GAUGES = {
    "running": "Requests in this replica's running batch.",
    "waiting": "Requests waiting for a slot in this replica.",
    "batch": "Rows this replica decodes together in its current step.",
}
STATS_COUNTERS = {
    "requests_finished": "Requests this replica finished.",
    "requests_failed": "Requests that failed in this replica.",
    "requests_cancelled": "Requests cancelled in this replica (Stop, disconnects).",
    "decode_steps": "Decode steps this replica ran.",
}


class ReplicaCollector(Collector):
    def __init__(self, engine: RemoteEngine) -> None:
        self.engine = engine

    def describe(self) -> list[Metric]:
        return []  # collected only on scrape, never at registration

    def collect(self) -> Iterator[Metric]:
        replicas = self.engine.replicas
        up = GaugeMetricFamily(
            "llm_engine_replicas", "Engine replicas that reported recently, by state.", labels=["state"]
        )
        states: dict[str, int] = {}
        for entry in replicas:
            states[entry["state"]] = states.get(entry["state"], 0) + 1
        for state, count in sorted(states.items()):
            up.add_metric([state], count)
        yield up
        for key, text in SNAPSHOT_GAUGES.items():
            gauge = GaugeMetricFamily(
                f"llm_replica_requests_{key}" if key != "batch" else "llm_replica_batch_size", text, labels=["replica"]
            )
            for entry in replicas:
                gauge.add_metric([str(entry["replica"])], entry["snapshot"].get(key, 0))
            yield gauge
        for key, text in STATS_COUNTERS.items():
            counter = CounterMetricFamily(f"llm_replica_{key}", text, labels=["replica"])
            for entry in replicas:
                counter.add_metric([str(entry["replica"])], entry["stats"].get(key, 0))
            yield counter
