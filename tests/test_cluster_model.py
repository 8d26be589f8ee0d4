"""The cluster model's request counts hold for 20 agents sharing one API server.

One agent's run gives the per-operation costs; the model scales them to N agents; 20 real agents
(in-process, one thread each, one fake API server and one fake cert-manager) then count what they
really send. A per-agent cost that grew with the number of agents (retries on conflicts, watches
re-established because the server is busy, lists that see other agents' objects) would show up
as a difference here. The bigger run is part of `make bench` (docs/scale.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster_model import (
    Cluster,
    Costs,
    check_within,
    costs_from,
    expected_requests,
    model,
    simulate,
)

AGENTS = 20
PODS = 1


@pytest.mark.parametrize("mode", ["cert-manager", "node-ca"])
def test_twenty_agents_send_what_the_model_predicts(tmp_path: Path, mode: str) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "many").mkdir()
    single = simulate(tmp_path / "one", mode, agents=1, pods_per_agent=PODS)
    costs = costs_from(single)
    many = simulate(tmp_path / "many", mode, agents=AGENTS, pods_per_agent=PODS)

    renewals = AGENTS * PODS if mode == "cert-manager" else AGENTS
    expected = expected_requests(costs, AGENTS, AGENTS * PODS, renewals)
    assert check_within(expected, many.counted) == []
    # The counts are real work, not zero on both sides: every agent created requests.
    assert many.counted["CREATE"] >= AGENTS
    if mode == "node-ca":
        # No API call per pod: the publishes of 20 pods sent nothing.
        assert many.phases["issue"] == {}


def test_the_check_catches_a_count_off_by_more_than_ten_percent() -> None:
    expected = {"CREATE": 100.0, "WATCH": 100.0}
    assert check_within(expected, {"CREATE": 100, "WATCH": 109}) == []
    assert check_within(expected, {"CREATE": 100, "WATCH": 111}) == [
        "WATCH: model 100, counted 111"
    ]
    assert check_within(expected, {"CREATE": 100, "WATCH": 100, "LIST": 5}) == [
        "LIST: model 0, counted 5"
    ]


def test_cluster_model_arithmetic() -> None:
    cluster = Cluster(nodes=5000, pods_per_node=110, lifetime_hours=24, renew_fraction=2 / 3)
    per_pod = Costs(
        start={"GET": 1, "WATCH": 1},
        issue={"CREATE": 1, "LIST": 1, "WATCH": 1},
        renew={"CREATE": 1, "LIST": 1, "WATCH": 1, "DELETE": 1},
    )
    node = Costs(start={"CREATE": 1, "LIST": 1, "WATCH": 1}, issue={}, renew=per_pod.renew)
    loads = {load.design[:3]: load for load in model(cluster, per_pod, node, 1.0, 0.002, 0.001)}
    # 550,000 certificates renewed every 16 h: 9.55 per second.
    assert cluster.renewals_per_second == pytest.approx(550_000 / 57_600)
    b = loads["(b)"]
    assert b.requests["CREATE"] == pytest.approx(9.548611, rel=1e-6)
    assert b.writes == pytest.approx(9.548611 * 4, rel=1e-6)  # CREATE, DELETE, 2 status writes
    assert b.objects == 550_000
    c = loads["(c)"]
    # 5,000 node CAs renewed every 16 h.
    assert c.requests["CREATE"] == pytest.approx(5000 / 57_600)
    assert c.objects == 5000
    assert loads["(a)"].objects == 1_100_000
    assert loads["(d)"].objects == pytest.approx(9.548611 * 1800, rel=1e-6)
