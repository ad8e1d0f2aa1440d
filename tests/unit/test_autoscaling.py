"""The adapter-pressure autoscaling policy: Ray's queue-length answer, plus one replica while
the replicas keep loading adapters faster than the limit (a fake context, Ray's shape)."""

from types import SimpleNamespace

from serve.autoscaling import ADAPTER_LOADS_PER_S, AdapterPressurePolicy, LoadRate


def ctx(replicas: int, in_flight: float, rates: list[float], target: float = 4.0):
    return SimpleNamespace(
        current_num_replicas=replicas, target_num_replicas=replicas, total_num_requests=in_flight,
        config=SimpleNamespace(get_target_ongoing_requests=lambda: target),
        aggregated_metrics={ADAPTER_LOADS_PER_S: {f"r{i}": r for i, r in enumerate(rates)}},
    )


def test_queue_length_alone_when_adapters_are_calm():
    policy = AdapterPressurePolicy(max_loads_per_s=2.0)
    assert policy(ctx(2, 16, [0.5, 1.0]))[0] == 4  # 16 in flight / 4 per replica
    assert policy(ctx(2, 2, [0.0, 0.0]))[0] == 0.5  # Ray's bounds and delays apply downstream


def test_adapter_pressure_adds_a_replica_even_when_requests_are_few():
    desired, state = AdapterPressurePolicy(max_loads_per_s=2.0)(ctx(2, 2, [5.0, 3.0]))
    assert desired == 3 and state == {"adapter_loads_per_s": 4.0}
    assert AdapterPressurePolicy(2.0)(ctx(2, 40, [5.0, 3.0]))[0] == 10  # the queue asks for more


def test_no_replicas_and_no_metrics():
    policy = AdapterPressurePolicy()
    assert policy(ctx(0, 0, []))[0] == 0
    empty = ctx(1, 4, [])
    empty.aggregated_metrics = None
    assert policy(empty)[0] == 1


def test_load_rate_is_loads_per_second_between_calls():
    now = [100.0]
    rate = LoadRate(clock=lambda: now[0])
    assert rate(10) == 0.0  # the first call has nothing to compare with
    now[0] = 102.0
    assert rate(16) == 3.0
    now[0] = 104.0
    assert rate(16) == 0.0
