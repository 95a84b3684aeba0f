from proxy.serving.auth_guard import AuthFailureGuard


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_failures_past_the_burst_are_held_back_per_client() -> None:
    clock = Clock()
    guard = AuthFailureGuard(burst=3, per_second=1, clock=clock)
    assert [guard.failed("1.2.3.4") for _ in range(3)] == [0, 0, 0]
    assert guard.failed("1.2.3.4") >= 1
    assert guard.failed("5.6.7.8") == 0  # another client is unaffected
    clock.now = 10
    assert guard.failed("1.2.3.4") == 0  # refilled


def test_the_table_is_bounded() -> None:
    guard = AuthFailureGuard(burst=1, max_clients=100)
    for i in range(1000):
        guard.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(guard._tokens) == 100
