"""Circuit breaker and retry budget, driven by a fake clock."""

from __future__ import annotations

from sidecar.health import Circuit, CircuitState, CircuitView, RetryBudget


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_circuit_opens_after_consecutive_failures_and_probes_after_cooldown() -> None:
    c = Circuit(failures_to_open=3, cooldown_s=10)
    for _ in range(2):
        assert c.try_acquire(0)
        c.failure(0)
    assert c.state is CircuitState.CLOSED
    assert c.try_acquire(0)
    c.failure(1)
    assert c.state is CircuitState.OPEN
    assert not c.try_acquire(5)
    assert c.available_at(5) == 11
    # after the cooldown exactly one probe is let through
    assert c.try_acquire(11)
    assert c.state is CircuitState.HALF_OPEN
    assert not c.try_acquire(11)
    c.success()
    assert c.state is CircuitState.CLOSED and c.failures == 0
    assert c.try_acquire(11)


def test_failed_probe_reopens_and_released_probe_frees_slot() -> None:
    c = Circuit(failures_to_open=1, cooldown_s=10)
    c.failure(0)
    assert c.try_acquire(10)
    c.failure(10)
    assert c.state is CircuitState.OPEN and not c.try_acquire(15)
    assert c.try_acquire(20)
    c.release()  # cancelled probe: another caller may probe
    assert c.try_acquire(20)


def test_success_resets_the_count() -> None:
    c = Circuit(failures_to_open=2, cooldown_s=10)
    c.failure(0)
    c.success()
    c.failure(0)
    assert c.state is CircuitState.CLOSED


def test_the_breaker_counts_failures_only() -> None:
    # A Retry-After is not the breaker's: it is a hold in the rate limiter (see
    # test_accounting and the limits contract). Below the threshold the circuit stays
    # closed and lets every call through, however the failures ended.
    c = Circuit(failures_to_open=5, cooldown_s=10)
    c.failure(0)
    assert c.state is CircuitState.CLOSED and c.failures == 1
    assert c.try_acquire(0) and c.available_at(0) <= 0
    assert c.view(0) == CircuitView("closed", 1, None)


def test_retry_budget_caps_retries_to_ratio_of_traffic() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, minimum=2, clock=clock)
    for _ in range(100):
        budget.record_request()
    allowed = sum(budget.try_spend() for _ in range(100))
    assert allowed == 22  # minimum 2 + 20% of 100
    clock.now += 11  # the window slides past
    assert budget.try_spend()
