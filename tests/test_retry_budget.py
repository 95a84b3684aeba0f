"""The retry budget bounds retries to a share of requests after a burst."""

from proxy.upstreams.retry_budget import RetryBudget


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_burst_is_capped_then_retries_follow_the_ratio() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_per_second=0, clock=clock)
    retries = 0
    for _ in range(1000):  # every request fails and wants a retry, all at one instant
        budget.deposit()
        retries += budget.try_spend()
    assert 209 <= retries <= 210  # the initial burst of 10, then 20% of 1000 (float rounding)


def test_floor_accrues_with_time() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.0, min_per_second=2, clock=clock)
    spent = sum(budget.try_spend() for _ in range(100))
    assert spent == 20  # ten seconds' worth of the floor
    clock.now = 1.0
    assert sum(budget.try_spend() for _ in range(100)) == 2


def test_no_budget_means_no_retries_once_spent() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.0, min_per_second=0, clock=clock)
    assert sum(budget.try_spend() for _ in range(50)) == 10
    clock.now = 1000
    assert not budget.try_spend()
