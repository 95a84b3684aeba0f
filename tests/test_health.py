"""The upstream health state machine, driven by an explicit clock."""

from proxy.config.types import HealthConfig
from proxy.upstreams.health import Health

POLICY = HealthConfig(failure_threshold=3, base_ejection=10, max_ejection=40, credentials_recheck=60)


def test_healthy_until_threshold_of_consecutive_failures() -> None:
    h = Health(POLICY)
    h.failure(0)
    h.failure(1)
    assert h.state(1) == "healthy" and h.available(1)
    h.failure(2)
    assert h.state(2) == "ejected" and not h.available(11)
    assert h.blocked_until() == 12


def test_success_resets_failure_count() -> None:
    h = Health(POLICY)
    h.failure(0)
    h.failure(0)
    h.success()
    h.failure(0)
    h.failure(0)
    assert h.state(0) == "healthy"


def test_half_open_lets_exactly_one_probe_through_and_success_readmits() -> None:
    h = Health(POLICY)
    for _ in range(3):
        h.failure(0)
    assert h.state(10) == "half_open" and h.available(10)
    h.begin(10)
    assert not h.available(10)  # the probe is out; nobody else goes
    h.success()
    assert h.state(10) == "healthy" and h.available(10)


def test_failed_probe_ejects_again_with_growing_backoff_capped() -> None:
    h = Health(POLICY)
    for _ in range(3):
        h.failure(0)
    backoffs = []
    now = 0.0
    for _ in range(4):
        now = h.blocked_until()
        h.begin(now)
        h.failure(now)
        backoffs.append(h.blocked_until() - now)
    assert backoffs == [20, 40, 40, 40]


def test_cooldown_holds_exactly_as_long_as_asked() -> None:
    h = Health(POLICY)
    h.cool_down(100, 7.5)
    assert h.state(107.4) == "cooling_down" and not h.available(107.4)
    assert h.state(107.5) == "healthy" and h.available(107.5)


def test_cooldown_never_shortens_an_ejection() -> None:
    h = Health(POLICY)
    for _ in range(3):
        h.failure(0)
    h.cool_down(0, 1)
    assert h.state(5) == "ejected"


def test_bad_credentials_hold_traffic_then_probe() -> None:
    h = Health(POLICY)
    h.credentials_rejected(0)
    assert h.state(59) == "credentials_bad" and not h.available(59)
    assert h.state(60) == "half_open" and h.available(60)


def test_check_ejection_lasts_until_a_check_passes() -> None:
    h = Health(POLICY)
    h.eject()
    assert h.state(10**6) == "ejected" and not h.available(10**6)
    h.success()
    assert h.state(0) == "healthy"
