"""Client keys: hashing, policies, and lookup of the static keys in the config.

Only SHA-256 digests of keys are kept in memory or in a store. A presented key
is hashed once and the digest looked up; the final comparison is constant time
so a near-miss digest takes as long as a far one.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from fnmatch import fnmatchcase
from typing import Protocol

from ..config.loader import utc_now
from ..config.types import Config, KeyConfig, Limits, TeamConfig
from ..errors import AuthenticationError, PermissionDeniedError


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class KeyPolicy:
    """What a presented key may do. ``id`` is stable and never secret."""

    id: str
    name: str
    team: str | None
    models: tuple[str, ...] | None  # allow-list of globs; None: every model
    limits: Limits
    expires_at: datetime | None = None
    team_models: tuple[str, ...] | None = None
    team_limits: Limits | None = None  # None: no team limits apply

    def allows(self, model: str) -> bool:
        return _matches(self.models, model) and _matches(self.team_models, model)

    def check_model(self, model: str) -> None:
        if not self.allows(model):
            raise PermissionDeniedError(
                f"The key '{self.name}' is not allowed to use the model '{model}'.", param="model")

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and (now or utc_now()) >= self.expires_at


def _matches(globs: Sequence[str] | None, model: str) -> bool:
    return globs is None or any(fnmatchcase(model, g) for g in globs)


def bearer_token(authorization: bytes | None) -> str:
    """The key from an ``Authorization: Bearer`` header, or AuthenticationError."""
    if not authorization:
        raise AuthenticationError(
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")
    scheme, _, token = authorization.decode("latin-1").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError("The Authorization header must be 'Bearer YOUR_KEY'.")
    return token


class StaticKeys:
    """The keys written in the config, found by the digest of the presented key."""

    def __init__(self, config: Config) -> None:
        self._by_digest = {k.key_sha256: (k.key_sha256, _policy(k, config)) for k in config.keys}
        self._teams = {t.name: t for t in config.teams}

    def find(self, digest: str) -> KeyPolicy | None:
        # The lookup is by the digest of a secret, whose bits a caller cannot steer;
        # the explicit constant-time compare makes the final match independent of
        # how far a near-miss got.
        stored, policy = self._by_digest.get(digest, ("", None))
        if policy is None or not hmac.compare_digest(stored, digest):
            return None
        return policy

    def policies(self) -> Iterable[KeyPolicy]:
        return (policy for _, policy in self._by_digest.values())

    def team(self, name: str) -> TeamConfig | None:
        return self._teams.get(name)


def _policy(key: KeyConfig, config: Config) -> KeyPolicy:
    team = config.team(key.team)
    return KeyPolicy(
        id=f"static:{key.name}",
        name=key.name,
        team=key.team,
        models=key.models,
        limits=key.limits,
        expires_at=key.expires_at,
        team_models=team.models if team else None,
        team_limits=team.limits if team else None,
    )


class IssuedKeySource(Protocol):
    """Keys issued through the admin API, and teams set there (``issued_keys.IssuedKeys``)."""

    def find(self, digest: str) -> KeyPolicy | None: ...

    def team(self, name: str) -> TeamConfig | None: ...


class Authenticator:
    """Presented key → policy, or a 401.

    Static keys first, then issued keys; both are in-memory lookups, so
    authenticating never waits for a store. A team set through the admin API
    overrides the config's team of the same name.
    """

    def __init__(self, static: StaticKeys, issued: IssuedKeySource | None = None) -> None:
        self._static = static
        self._issued = issued

    async def authenticate(self, authorization: bytes | None) -> KeyPolicy:
        digest = hash_key(bearer_token(authorization))
        policy = self._static.find(digest)
        if policy is None and self._issued is not None:
            policy = self._issued.find(digest)
        if policy is None:
            raise AuthenticationError("Incorrect API key provided.")
        if policy.expired():
            raise AuthenticationError("The API key provided has expired.", code="expired_api_key")
        return self._with_team(policy)

    def _with_team(self, policy: KeyPolicy) -> KeyPolicy:
        if policy.team is None:
            return policy
        team = (self._issued.team(policy.team) if self._issued is not None else None) \
            or self._static.team(policy.team)
        models, limits = (team.models, team.limits) if team is not None else (None, None)
        if policy.team_models == models and policy.team_limits == limits:
            return policy
        return replace(policy, team_models=models, team_limits=limits)
