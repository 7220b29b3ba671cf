"""The speed benchmark's arithmetic: ratios are taken within a round, so a noisy minute can't fake a speed-up."""

from __future__ import annotations

from typing import Any

from bench.bench_speed import BASELINE, FOUND_BASELINE, summarize_rounds


def level(server: str, round_index: int, clients: int, tokens_per_s: float) -> dict[str, Any]:
    return {
        "round": round_index,
        "server": server,
        "clients": clients,
        "requests": 8,
        "failed": 0,
        "tokens_per_s": tokens_per_s,
        "ttft_p50_s": 0.1 * (round_index + 1),
        "ttft_p95_s": 0.2,
        "peak_rss_mb": 1000.0 + round_index,
    }


def test_each_ratio_pairs_a_server_with_the_baseline_of_its_own_round() -> None:
    # the machine slows and speeds up between rounds; the engine is 3x, 2x and 3x the baseline beside it
    rounds = [
        level(BASELINE, 0, 1, 10.0),
        level(BASELINE, 1, 1, 20.0),
        level(BASELINE, 2, 1, 40.0),
        level(FOUND_BASELINE, 0, 1, 5.0),
        level(FOUND_BASELINE, 1, 1, 10.0),
        level(FOUND_BASELINE, 2, 1, 20.0),
        level("engine", 0, 1, 30.0),
        level("engine", 1, 1, 40.0),
        level("engine", 2, 1, 120.0),
    ]
    rows = {row["server"]: row for row in summarize_rounds(rounds)}
    engine = rows["engine"]
    assert engine["ratio_each"] == [3.0, 2.0, 3.0]
    assert engine["ratio"] == 3.0  # the ratio of the medians (40 / 20) would say 2.0
    assert engine["ratio_to_found"] == 6.0
    assert engine["tokens_per_s"] == 40.0
    assert engine["ttft_p50_s"] == 0.2
    assert engine["peak_rss_mb"] == 1002.0
    assert rows[BASELINE]["ratio"] == 1.0
    assert rows[FOUND_BASELINE]["ratio"] == 0.5


def test_levels_of_different_client_counts_are_kept_apart() -> None:
    rounds = [level(BASELINE, 0, 1, 10.0), level(BASELINE, 0, 16, 12.0), level("engine", 0, 16, 120.0)]
    rows = {(row["server"], row["clients"]): row for row in summarize_rounds(rounds)}
    assert rows["engine", 16]["ratio"] == 10.0
    assert rows["engine", 16]["ratio_to_found"] == 0.0  # no such baseline in this run: no ratio, not a guess
