"""Who is calling: an API key names a tenant; a tenant has a weight and a priority in the queues.

Keys are hashed (SHA-256) when the app is built; replicas, Serve's checkpoints, logs and metrics only ever
see hashes and tenant names. Without keys the API is open and a header names the tenant.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from raylm import errors
from raylm.config import ServeConfig
from raylm.contract import Tenant


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Access:
    key_hashes: Mapping[str, str]  # SHA-256 of a key → its tenant
    tenants: Mapping[str, Tenant]
    tenant_header: str = "x-raylm-tenant"

    def tenant(self, headers: Mapping[str, str]) -> Tenant:
        """The caller's tenant; raises AuthenticationError (401) when keys are configured and this one is not."""
        if self.key_hashes:
            scheme, _, key = headers.get("authorization", "").partition(" ")
            if not scheme and headers.get("x-api-key"):  # Anthropic's SDKs send the key so
                scheme, key = "bearer", headers["x-api-key"]
            if scheme.lower() != "bearer" or not key.strip():
                raise errors.AuthenticationError(
                    "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
                    code="missing_api_key")
            name = self.key_hashes.get(hash_key(key.strip()))
            if name is None:
                raise errors.AuthenticationError("Incorrect API key provided.", code="invalid_api_key")
        else:
            name = headers.get(self.tenant_header) or "default"
        return self.tenants.get(name) or Tenant(name)


def load_access(config: ServeConfig) -> Access:
    """Keys from the config and from `api_keys_file` (one `tenant:key` per line, `#` comments)."""
    pairs = [(k.tenant, k.key.get_secret_value()) for k in config.api_keys]
    if config.api_keys_file is not None:
        pairs += _read_keys_file(config.api_keys_file)
    tenants = {name: Tenant(name, t.weight, t.priority) for name, t in config.tenants.items()}
    return Access({hash_key(key): tenant for tenant, key in pairs}, tenants, config.tenant_header.lower())


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
