"""Who is calling: an API key names a tenant; a tenant has a weight and a priority in the queues.

    keys configured (serve.api_keys, serve.api_keys_file):
        no key / unknown key ─► 401
        a key ─► its tenant; owner of its Batch API objects; admin if the tenant is in serve.admin_tenants
    no keys (loopback, or serve.allow_anonymous):
        x-raylm-tenant header ─► the queue it waits in, nothing more: every anonymous caller owns the same
        Batch API objects (never a keyed tenant's), and is admin only on a loopback bind (the laptop's user)

Fails closed: a keys file that exists but holds no key is a start-up error, not an open service (and a
non-loopback bind without keys is refused by the config). Keys are hashed (SHA-256) when the app is built;
replicas, Serve's checkpoints, logs and metrics only ever see hashes and tenant names.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from raylm import errors
from raylm.config import ServeConfig
from raylm.contract import Tenant

# The owner of objects made without keys: no tenant can be named so (TENANT_NAME).
ANONYMOUS = "~anonymous"
TENANT_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id(key_hash: str) -> str:
    """A key as usage and the access log name it: `key_` and the first 16 hex digits of its SHA-256 (what
    `echo -n "$KEY" | sha256sum` starts with), never the key."""
    return "key_" + key_hash[:16]


@dataclass(frozen=True)
class Caller:
    tenant: Tenant  # whose queue and share
    owner: str  # whose Batch API objects: the tenant's name with keys, ANONYMOUS without
    admin: bool = False  # sees every tenant's figures and the replicas' internals (/status)
    key_id: str = ""  # the key's id in usage and logs (key_id()), "" without keys


@dataclass(frozen=True)
class Access:
    key_hashes: Mapping[str, str]  # SHA-256 of a key → its tenant
    tenants: Mapping[str, Tenant]
    tenant_header: str = "x-raylm-tenant"
    admins: frozenset[str] = field(default_factory=frozenset)
    anonymous_admin: bool = False  # without keys, on a loopback bind
    salt_secret: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)  # cache salts

    @property
    def keyed(self) -> bool:
        return bool(self.key_hashes)

    def caller(self, headers: Mapping[str, str]) -> Caller:
        """Who calls; raises AuthenticationError (401) when keys are configured and this one is not."""
        if not self.keyed:
            name = headers.get(self.tenant_header) or "default"
            return Caller(self._tenant(name), ANONYMOUS, self.anonymous_admin)
        scheme, _, key = headers.get("authorization", "").partition(" ")
        if not scheme and headers.get("x-api-key"):  # Anthropic's SDKs send the key so
            scheme, key = "bearer", headers["x-api-key"]
        if scheme.lower() != "bearer" or not key.strip():
            raise errors.AuthenticationError(
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.", code="missing_api_key")
        hashed = hash_key(key.strip())
        name = self.key_hashes.get(hashed)
        if name is None:
            raise errors.AuthenticationError("Incorrect API key provided.", code="invalid_api_key")
        return Caller(self._tenant(name), name, name in self.admins, key_id(hashed))

    def tenant(self, headers: Mapping[str, str]) -> Tenant:
        return self.caller(headers).tenant

    def _tenant(self, name: str) -> Tenant:
        return self.tenants.get(name) or Tenant(name)


def load_access(config: ServeConfig) -> Access:
    """Keys from the config and from `api_keys_file` (one `tenant:key` per line, `#` comments)."""
    pairs = [(k.tenant, k.key.get_secret_value()) for k in config.api_keys]
    if config.api_keys_file is not None:
        from_file = _read_keys_file(config.api_keys_file)
        if not from_file:
            raise ValueError(f"{config.api_keys_file} holds no API key: refusing to start with auth off "
                             "(add `tenant:key` lines, or remove serve.api_keys_file)")
        pairs += from_file
    for tenant, _ in pairs:
        if not TENANT_NAME.fullmatch(tenant):
            raise ValueError(f"tenant name {tenant[:64]!r} must be 1-64 letters, digits or _ . @ -")
    tenants = {name: Tenant(name, t.weight, t.priority) for name, t in config.tenants.items()}
    return Access({hash_key(key): tenant for tenant, key in pairs}, tenants, config.tenant_header.lower(),
                  frozenset(config.admin_tenants), anonymous_admin=config.loopback)


def _read_keys_file(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for number, line in enumerate(Path(path).expanduser().read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        tenant, sep, key = line.partition(":")
        if not sep or not tenant.strip() or not key.strip():
            # Never echo the line: it may hold a key.
            raise ValueError(f"{path}:{number}: expected `tenant:key`")
        pairs.append((tenant.strip(), key.strip()))
    return pairs
