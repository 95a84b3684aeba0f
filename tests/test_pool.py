"""Selection over the pool: tiers, strategies, caps; no sockets."""

import random
from collections import Counter

import pytest

from proxy.config.loader import parse_config
from proxy.errors import ModelNotFoundError
from proxy.upstreams.pool import Pool, make_selector


def _pool(strategy: str, upstreams: str) -> Pool:
    config = parse_config(f"routing: {{strategy: {strategy}}}\nupstreams:\n{upstreams}", {})
    return Pool(config, make_selector(config.routing.strategy, random.Random(7)))


THREE = """
  - {name: a, base_url: "http://a/v1", models: [m], weight: 1}
  - {name: b, base_url: "http://b/v1", models: [m], weight: 3}
  - {name: c, base_url: "http://c/v1", models: {m: own-m}, weight: 6}
"""


def _picks(pool: Pool, count: int) -> Counter[str]:
    cands = pool.candidates("m")
    return Counter(pool.pick("m", cands, set(), 0).upstream.name for _ in range(count))  # type: ignore[union-attr]


def test_unknown_model_is_404_model_not_found() -> None:
    with pytest.raises(ModelNotFoundError) as err:
        _pool("round_robin", THREE).candidates("nope")
    assert err.value.status == 404 and err.value.code == "model_not_found" and err.value.param == "model"


def test_map_form_names_the_upstream_model() -> None:
    cands = _pool("round_robin", THREE).candidates("m")
    assert {c.upstream.name: c.model for c in cands} == {"a": "m", "b": "m", "c": "own-m"}


def test_round_robin_is_even() -> None:
    assert _picks(_pool("round_robin", THREE), 300) == {"a": 100, "b": 100, "c": 100}


def test_weighted_shares_are_exact_over_a_cycle() -> None:
    assert _picks(_pool("weighted", THREE), 1000) == {"a": 100, "b": 300, "c": 600}


def test_least_requests_avoids_the_busy_upstream() -> None:
    pool = _pool("least_requests", THREE.replace("weight: 3", "weight: 1").replace("weight: 6", "weight: 1"))
    pool.upstreams["a"].in_flight = 50
    counts = _picks(pool, 600)
    assert counts["a"] < 60  # only when both random choices... never both 'a': P2C picks the other
    assert counts["b"] > 200 and counts["c"] > 200


def test_latency_prefers_fastest_but_still_explores() -> None:
    pool = _pool("latency", THREE)
    for name, ttfb in (("a", 0.5), ("b", 0.05), ("c", 0.9)):
        pool.upstreams[name].observe_ttfb(ttfb)
    counts = _picks(pool, 1000)
    assert counts["b"] > 900 and counts["a"] + counts["c"] > 0


def test_lower_priority_tier_only_when_every_better_one_is_unavailable() -> None:
    pool = _pool("round_robin", """
  - {name: primary1, base_url: "http://a/v1", models: [m]}
  - {name: primary2, base_url: "http://b/v1", models: [m]}
  - {name: backup, base_url: "http://c/v1", models: [m], priority: 1}
""")
    assert set(_picks(pool, 10)) == {"primary1", "primary2"}
    pool.upstreams["primary1"].health.cool_down(0, 30)
    assert set(_picks(pool, 10)) == {"primary2"}
    pool.upstreams["primary2"].health.credentials_rejected(0)
    assert set(_picks(pool, 10)) == {"backup"}


def test_tried_and_saturated_upstreams_are_skipped() -> None:
    pool = _pool("round_robin", """
  - {name: a, base_url: "http://a/v1", models: [m], max_concurrency: 2}
  - {name: b, base_url: "http://b/v1", models: [m]}
""")
    cands = pool.candidates("m")
    pool.upstreams["a"].in_flight = 2
    assert {pool.pick("m", cands, set(), 0).upstream.name for _ in range(5)} == {"b"}  # type: ignore[union-attr]
    assert pool.pick("m", cands, {"b"}, 0) is None


def test_reload_keeps_health_of_unchanged_upstreams_only() -> None:
    old = _pool("round_robin", THREE)
    old.upstreams["a"].health.cool_down(0, 100)
    old.upstreams["b"].health.cool_down(0, 100)
    changed = THREE.replace("weight: 3", "weight: 4")
    config = parse_config(f"upstreams:\n{changed}", {})
    new = Pool(config, make_selector("round_robin"), keep=old.upstreams)
    assert new.upstreams["a"].health.state(1) == "cooling_down"
    assert new.upstreams["b"].health.state(1) == "healthy"
