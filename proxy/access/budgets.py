"""Remaining token budgets as gauges, read from the quota store periodically
(never per request): one read per key or team with a day or month budget."""

from __future__ import annotations

from collections.abc import Iterable

from ..config.types import TeamConfig
from ..errors import ServiceUnavailableError
from ..telemetry.metrics import Metrics
from .issued_keys import IssuedKeys
from .keys import KeyPolicy
from .quotas import QuotaService, Usage

BUDGETS = ("tokens_per_day", "tokens_per_month")


def _has_budget(limits: object) -> bool:
    return any(getattr(limits, name, None) is not None for name in BUDGETS)


class BudgetGauges:
    def __init__(self, quotas: QuotaService, metrics: Metrics, issued: IssuedKeys) -> None:
        self._quotas = quotas
        self._metrics = metrics
        self._issued = issued

    async def refresh(self, static_keys: Iterable[KeyPolicy], teams: Iterable[TeamConfig]) -> None:
        try:
            keys = [*static_keys, *(k.policy() for k in await self._issued.keys() if k.revoked_at is None)]
            all_teams = {t.name: t for t in [*teams, *await self._issued.teams()]}
            for policy in keys:
                if _has_budget(policy.limits):
                    self._export("key", policy.name, await self._quotas.key_usage(policy))
            for team in all_teams.values():
                if _has_budget(team.limits):
                    self._export("team", team.name, await self._quotas.team_usage(team.name, team.limits))
        except ServiceUnavailableError:
            return  # the store is down: the gauges keep their last values; store errors are counted

    def _export(self, scope: str, name: str, rows: list[Usage]) -> None:
        for row in rows:
            if row.limit in BUDGETS:
                self._metrics.budget_remaining(scope, name, row.limit, row.remaining, total=row.value)
