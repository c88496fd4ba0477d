"""The expert-worker autoscaling policy (cluster/control/autoscale_policy.py) and what feeds it: the
workers' busy clock (experts/busy_clock.py), the meter that turns two readings into a window's loads,
and the status record /metrics and `nextserve status` show. Pure: time is passed in."""

from __future__ import annotations

import json

import pytest

from nextserve.cluster.cli.cluster_commands import scaling_lines
from nextserve.cluster.control.autoscale_meter import BusyReading, WorkerLoadMeter
from nextserve.cluster.control.autoscale_policy import (Direction, ScaleRange, ScaleRangeError, ScalingDecision,
                                                        WorkerAutoscaleConfig, WorkerAutoscalePolicy, WorkerLoad)
from nextserve.cluster.control.scaling_status import ScalingStatus
from nextserve.cluster.gateway.metrics import GatewayMetrics
from nextserve.experts.busy_clock import BusyClock
from nextserve.router.placement import build_placement

CONFIG = WorkerAutoscaleConfig(ScaleRange(2, 4), busy_high=0.6, busy_low=0.25, upscale_delay_s=10,
                               downscale_delay_s=30, cooldown_s=20)


def loads(busy: float, n: int, inflight: float = 0.5) -> list[WorkerLoad]:
    return [WorkerLoad(i, busy, inflight) for i in range(n)]


def run(policy: WorkerAutoscalePolicy, busy: float, current: int, start: float, until: float,
        every: float = 2.0, inflight: float = 0.5) -> list[ScalingDecision]:
    """Decisions of windows every `every` s from `start` to `until` at a steady load."""
    out, t = [], start
    while t <= until:
        out.append(policy.decide(loads(busy, current, inflight), current, t))
        t += every
    return out


def test_range_parses_and_refuses_what_is_not_min_max() -> None:
    assert ScaleRange.parse("2:3") == ScaleRange(2, 3) and str(ScaleRange(2, 3)) == "2:3"
    for bad in ("3", "3:2", "0:2", "a:b", "2:", ""):
        with pytest.raises(ScaleRangeError, match="MIN:MAX"):
            ScaleRange.parse(bad)


def test_sustained_busy_scales_up_after_the_delay_not_before() -> None:
    policy = WorkerAutoscalePolicy(CONFIG)
    decisions = run(policy, 0.9, 2, start=0, until=8)
    assert all(d.direction is Direction.HOLD and d.desired == 2 for d in decisions)
    up = policy.decide(loads(0.9, 2), 2, 10)
    # ceil(2 * 0.9 / 0.425) = 5, capped at MAX 4
    assert (up.direction, up.desired) == (Direction.UP, 4)
    assert "busy 0.90 > 0.6" in up.reason


def test_a_single_idle_window_restarts_the_upscale_delay() -> None:
    policy = WorkerAutoscalePolicy(CONFIG)
    run(policy, 0.9, 2, start=0, until=8)
    assert policy.decide(loads(0.0, 2), 2, 9).direction is Direction.HOLD
    assert all(d.direction is Direction.HOLD for d in run(policy, 0.9, 2, start=10, until=18))
    assert policy.decide(loads(0.9, 2), 2, 20).direction is Direction.UP


def test_queueing_scales_up_even_when_busy_is_moderate() -> None:
    policy = WorkerAutoscalePolicy(CONFIG)
    run(policy, 0.5, 2, start=0, until=8, inflight=2.0)
    up = policy.decide(loads(0.5, 2, 2.0), 2, 10)
    assert (up.direction, up.desired) == (Direction.UP, 3) and "calls in flight 2.00 > 1.5" in up.reason


def test_the_band_between_low_and_high_holds_forever() -> None:
    policy = WorkerAutoscalePolicy(CONFIG)
    assert all(d.direction is Direction.HOLD for d in run(policy, 0.4, 3, start=0, until=600))


def test_idle_scales_down_one_at_a_time_with_a_cooldown_and_stops_at_min() -> None:
    policy = WorkerAutoscalePolicy(CONFIG)
    sizes, current, t = [], 4, 0.0
    while t <= 400:
        d = policy.decide(loads(0.0, current), current, t)
        if d.direction is not Direction.HOLD:
            assert d.direction is Direction.DOWN and d.desired == current - 1
            sizes.append((t, d.desired))
            current = d.desired
        t += 2
    assert [n for _, n in sizes] == [3, 2]  # MIN 2: never below
    assert sizes[0][0] == 30  # cold for downscale_delay_s
    assert sizes[1][0] - sizes[0][0] >= CONFIG.downscale_delay_s  # the delay restarts after a change


def test_no_scale_down_that_the_next_window_would_undo() -> None:
    """busy 0.24 < busy_low on 2 workers would be 0.48 on 1; on 4 -> 3 it is 0.32: fine. But 0.5 on
    5 workers with busy_low 0.55 would be 0.625 > busy_high on 4: held."""
    config = WorkerAutoscaleConfig(ScaleRange(1, 5), busy_high=0.6, busy_low=0.55, downscale_delay_s=0)
    policy = WorkerAutoscalePolicy(config)
    assert all(d.direction is Direction.HOLD for d in run(policy, 0.5, 5, start=0, until=200))
    assert policy.decide(loads(0.3, 5), 5, 202).direction is Direction.DOWN


def test_cooldown_holds_after_a_change_whatever_the_load() -> None:
    policy = WorkerAutoscalePolicy(CONFIG)
    run(policy, 0.9, 2, start=0, until=10)  # scaled up at t = 10
    held = run(policy, 0.9, 3, start=12, until=28)
    assert all(d.direction is Direction.HOLD and "cooling down" in d.reason for d in held)


def test_outside_the_range_is_brought_back_at_once() -> None:
    policy = WorkerAutoscalePolicy(CONFIG)
    assert policy.decide(loads(0.0, 6), 6, 0).desired == 4
    assert WorkerAutoscalePolicy(CONFIG).decide(loads(0.9, 1), 1, 0).desired == 2


def test_the_floor_keeps_r_replicas_and_every_expert_served_at_the_floor() -> None:
    config = WorkerAutoscaleConfig(ScaleRange(1, 4), expert_replicas=2, downscale_delay_s=0, cooldown_s=0)
    policy, current = WorkerAutoscalePolicy(config), 4
    for t in range(0, 100, 2):
        current = policy.decide(loads(0.0, current), current, t).desired
    assert current == config.floor == 2
    placement = build_placement((0, 1, 2), 11, current, 2)
    for layer in placement.layers:
        assert all(len(set(ws)) == 2 for ws in placement.layer_to_expert_workers[layer])


def test_no_measurements_hold() -> None:
    decision = WorkerAutoscalePolicy(CONFIG).decide([], 3, 0)
    assert decision.direction is Direction.HOLD and "no load measured" in decision.reason


def test_config_refuses_an_inverted_band_and_replicas_past_the_range() -> None:
    with pytest.raises(ValueError, match="busy_low=0.7 and busy_high=0.6"):
        WorkerAutoscaleConfig(ScaleRange(1, 2), busy_low=0.7)
    with pytest.raises(ValueError, match="expert_replicas=3 exceeds"):
        WorkerAutoscaleConfig(ScaleRange(1, 2), expert_replicas=3)


def test_busy_clock_integrates_busy_time_and_calls_in_flight() -> None:
    now = [0.0]
    clock = BusyClock(lambda: now[0])
    clock.start()          # t 0: 1 in flight
    now[0] = 1.0
    clock.start()          # t 1: 2 in flight
    now[0] = 2.0
    clock.end()            # t 2: 1
    now[0] = 3.0
    clock.end()            # t 3: 0
    now[0] = 10.0
    assert clock.totals() == (3.0, 4.0)  # busy 0..3; in flight 1 + 2 + 1
    clock.start()
    now[0] = 12.0
    assert clock.totals() == (5.0, 6.0)  # the open interval counts


def test_meter_turns_two_readings_into_a_window_and_restarts_on_a_new_address() -> None:
    meter = WorkerLoadMeter()
    assert meter.measure([BusyReading(0, "a:1", 0.0, 0.0, 0.0), BusyReading(1, "b:1", 0.0, 5.0, 5.0)]) == []
    got = meter.measure([BusyReading(0, "a:1", 2.0, 1.0, 3.0), BusyReading(1, "b:2", 2.0, 0.1, 0.1)])
    assert got == [WorkerLoad(0, 0.5, 1.5)]  # worker 1 restarted (new address): no window yet
    got = meter.measure([BusyReading(1, "b:2", 4.0, 2.1, 2.1)])
    assert got == [WorkerLoad(1, 1.0, 1.0)] and set(meter.last) == {1}  # worker 0 retired: forgotten


def test_scaling_status_round_trips_and_feeds_metrics() -> None:
    decision = ScalingDecision("workers", 2, 3, Direction.UP, "pool busy 0.90: busy 0.90 > 0.6 for 10 s", 1.7e9)
    status = ScalingStatus(1, 2, "1:2", 2, 3, "2:3", {0: 0.9, 1: 0.8}, {0: 1.0, 1: 0.9}, decision, "why",
                           {"workers:up": 1, "heads:up": 2})
    assert ScalingStatus.from_json(status.to_json()) == status
    metrics = GatewayMetrics()
    metrics.observe_scaling(status)
    metrics.observe_scaling(ScalingStatus.from_json(status.to_json().replace('"1": 0.8', '"2": 0.7')))
    text = metrics.render()[0].decode()
    assert "nextserve_head_replicas 1.0" in text and "nextserve_head_replicas_desired 2.0" in text
    assert "nextserve_expert_workers 2.0" in text and "nextserve_expert_workers_desired 3.0" in text
    assert 'nextserve_expert_worker_busy_fraction{worker="2"} 0.7' in text
    assert 'nextserve_expert_worker_busy_fraction{worker="1"}' not in text  # gone with its worker
    assert 'nextserve_scaling_decisions{direction="up",pool="heads"} 2.0' in text
    assert 'nextserve_scaling_decisions{direction="down",pool="workers"} 0.0' in text
    assert 'reason="pool busy 0.90: busy 0.90 > 0.6 for 10 s"' in text


def test_status_lines_show_sizes_ranges_and_the_last_decision() -> None:
    decision = ScalingDecision("heads", 1, 2, Direction.UP, "Serve's autoscaler: 5.0 requests", 1.7e9)
    status = json.loads(ScalingStatus(1, 2, "1:2", 2, 2, None, last_decision=decision, last_reason="").to_json())
    lines = scaling_lines(status)
    assert lines[0] == "scaling: heads 1 (desired 2, autoscaled 1:2)  workers 2 (desired 2, fixed)"
    assert lines[1].endswith("heads 1 -> 2: Serve's autoscaler: 5.0 requests") and len(lines) == 2
