"""The fleet's authority: who may connect to the broker, and to which subjects.

One operator, a system account, and one account per tenant, kept in a data
folder. Devices get bearer JWTs (their MQTT password) signed by a tenant's
scoped signing key, whose template confines each device to its own topics;
host components get .creds signed by the tenant's ordinary signing key.
Seeds stay in the folder, mode 0600; nothing here prints them.

Folder layout (JWTs and state are public, *.nk are secrets):
    operator.nk  operator.jwt
    system/account.nk  users.nk  account.jwt  state.json     (the system account)
    accounts/<tenant>/account.nk  users.nk  devices.nk  account.jwt  state.json
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet.broker.jwt import (
    JwtError,
    NKey,
    Permissions,
    UserScope,
    account_jwt,
    decode_jwt,
    format_creds,
    key_from_seed,
    new_account_key,
    new_operator_key,
    new_user_key,
    operator_jwt,
    user_jwt,
    user_limits,
    write_secret,
)
from fleet.errors import FleetError
from fleet.protocol import protocol, topic_root
from fleet.schema import valid_id

SYSTEM_TENANT = "$SYS"
DEFAULT_TENANT = "fleet"
DEVICE_ROLE = "device"
CLAIMS_UPDATE_SUBJECT = "$SYS.REQ.CLAIMS.UPDATE"
# Filled in by nats-server from each device's user JWT when it connects.
DEVICE_NAME = "{{name()}}"


class AuthorityError(FleetError, ValueError):
    pass


def _subject(*tokens: str) -> str:
    # MQTT fleet/<id>/config/reported is NATS fleet.<id>.config.reported.
    return ".".join(token.replace("/", ".") for token in tokens)


def device_permissions(device: str = DEVICE_NAME) -> Permissions:
    """What one device may do, from firmware/protocol.json: publish what it sends,
    subscribe to what is sent to it and to the fleet-wide topics.

    MQTT's own $MQTT.> subjects need no grant: the server allows them to MQTT clients.
    """
    spec = protocol()
    root = topic_root()
    sent = [name for name, topic in spec["topics"].items() if topic["from"] == "device"]
    received = [name for name, topic in spec["topics"].items() if topic["from"] != "device"]
    return Permissions(
        pub_allow=[_subject(root, device, name) for name in sent],
        sub_allow=[_subject(root, device, name) for name in received]
        + [_subject(root, name) for name in spec["fleet_topics"]],
    )


def device_template() -> dict[str, Any]:
    # Bearer: an MQTT client sends the JWT as its password and cannot sign a nonce.
    # MQTT only: a leaked device token opens no plain NATS connection.
    return user_limits(device_permissions(), bearer_token=True, connection_types=["MQTT"])


def _read_key(path: Path) -> NKey:
    return key_from_seed(path.read_text())


def _load_or_create_key(path: Path, make: Any) -> NKey:
    if path.exists():
        return _read_key(path)
    key: NKey = make()
    write_secret(path, key.seed + "\n")
    return key


@dataclass
class Tenant:
    """One account: its keys, its current JWT, and which user keys each device holds."""

    name: str
    folder: Path
    account: NKey = field(repr=False)
    users_signer: NKey = field(repr=False)
    devices_signer: NKey = field(repr=False)
    devices: dict[str, list[str]] = field(default_factory=dict[str, list[str]])
    revocations: dict[str, int] = field(default_factory=dict[str, int])
    issued_at: int = 0

    @property
    def public(self) -> str:
        return self.account.public

    @property
    def jwt_path(self) -> Path:
        return self.folder / "account.jwt"

    @property
    def state_path(self) -> Path:
        return self.folder / "state.json"

    @property
    def jwt(self) -> str:
        return self.jwt_path.read_text().strip()

    def save_state(self) -> None:
        state = {"devices": self.devices, "revocations": self.revocations, "issued_at": self.issued_at}
        tmp = self.state_path.with_name("state.json.tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.state_path)

    @classmethod
    def load(cls, name: str, folder: Path) -> "Tenant":
        folder.mkdir(parents=True, exist_ok=True)
        tenant = cls(
            name,
            folder,
            account=_load_or_create_key(folder / "account.nk", new_account_key),
            users_signer=_load_or_create_key(folder / "users.nk", new_account_key),
            devices_signer=_load_or_create_key(folder / "devices.nk", new_account_key),
        )
        if tenant.state_path.exists():
            state = json.loads(tenant.state_path.read_text())
            tenant.devices = {str(k): [str(p) for p in v] for k, v in state.get("devices", {}).items()}
            tenant.revocations = {str(k): int(v) for k, v in state.get("revocations", {}).items()}
            tenant.issued_at = int(state.get("issued_at", 0))
        return tenant


class Authority:
    """The operator over a data folder; created on first use, reused after."""

    def __init__(self, folder: Path, operator_name: str = "fleet") -> None:
        self.folder = Path(folder)
        # Only its owner may list it; the seeds in it are 0600 besides.
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.operator = _load_or_create_key(self.folder / "operator.nk", new_operator_key)
        self._tenants: dict[str, Tenant] = {}
        system = self._load_tenant(SYSTEM_TENANT, self.folder / "system")
        operator_path = self.folder / "operator.jwt"
        if not operator_path.exists():
            operator_path.write_text(operator_jwt(self.operator, operator_name, system_account=system.public) + "\n")
        accounts = self.folder / "accounts"
        accounts.mkdir(exist_ok=True)
        for folder_of_tenant in sorted(accounts.iterdir()):
            if folder_of_tenant.is_dir():
                self._load_tenant(folder_of_tenant.name, folder_of_tenant)
        if DEFAULT_TENANT not in self._tenants:
            self.add_tenant(DEFAULT_TENANT)

    def __repr__(self) -> str:
        return f"Authority({str(self.folder)!r}, operator={self.operator.public!r})"

    # --- what the server is configured with -------------------------------------------

    @property
    def operator_jwt(self) -> str:
        return (self.folder / "operator.jwt").read_text().strip()

    @property
    def system_account(self) -> str:
        return self._tenants[SYSTEM_TENANT].public

    def tenants(self) -> list[str]:
        return sorted(name for name in self._tenants if name != SYSTEM_TENANT)

    def account_public(self, tenant: str) -> str:
        return self._tenant(tenant).public

    def account_jwt(self, tenant: str) -> str:
        return self._tenant(tenant).jwt

    def server_config_fragment(self, resolver_dir: Path) -> str:
        """nats-server config for operator mode with a full resolver (the server keeps
        account JWTs in `resolver_dir` and takes updates on $SYS.REQ.CLAIMS.UPDATE).

        Preloaded JWTs only seed the resolver; a newer pushed JWT there wins.
        """
        preload = "\n".join(f"  {tenant.public}: {tenant.jwt}" for tenant in self._tenants.values())
        return f"""operator: {self.operator_jwt}
system_account: {self.system_account}
resolver: {{
  type: full
  dir: "{resolver_dir}"
  allow_delete: false
}}
resolver_preload: {{
{preload}
}}
"""

    # --- tenants -----------------------------------------------------------------------

    def add_tenant(self, name: str) -> str:
        """A new account (JetStream on, a device scope), or the existing one; its public key."""
        if name == SYSTEM_TENANT or not valid_id(name):
            raise AuthorityError(f"not a valid tenant name: {name!r}")
        if name not in self._tenants:
            self._load_tenant(name, self.folder / "accounts" / name)
        return self._tenants[name].public

    def _load_tenant(self, name: str, folder: Path) -> Tenant:
        tenant = Tenant.load(name, folder)
        self._tenants[name] = tenant
        if not tenant.jwt_path.exists():
            self._mint_account(tenant)
        return tenant

    def _tenant(self, name: str) -> Tenant:
        try:
            return self._tenants[name]
        except KeyError:
            raise AuthorityError(f"no tenant {name!r}; known: {', '.join(self.tenants())}") from None

    def _mint_account(self, tenant: Tenant) -> str:
        # Strictly newer than the last: the resolver (and its preload) replaces a JWT
        # by one with an equal iat, so a stale copy from the same second would win.
        tenant.issued_at = max(int(time.time()), tenant.issued_at + 1)
        if tenant.name == SYSTEM_TENANT:
            token = account_jwt(
                self.operator, tenant.public, "SYS", jetstream=False,
                signing_keys=[tenant.users_signer.public], issued_at=tenant.issued_at,
            )
        else:
            scope = UserScope(tenant.devices_signer.public, DEVICE_ROLE, device_template(),
                              "devices: own topics only, MQTT, bearer")
            token = account_jwt(
                self.operator, tenant.public, tenant.name,
                signing_keys=[tenant.users_signer.public, scope],
                revocations=tenant.revocations, issued_at=tenant.issued_at,
            )
        tenant.jwt_path.write_text(token + "\n")
        tenant.save_state()
        return token

    # --- users -------------------------------------------------------------------------

    def issue_device(self, tenant: str, device_id: str, expires: int | None = None) -> str:
        """A bearer JWT for one device (its MQTT password), with a fresh user key.

        The key's seed is not kept: a bearer token proves nothing with it. A fresh
        key per JWT means a JWT issued after a revocation works at once.
        """
        if not valid_id(device_id):
            raise AuthorityError(f"not a valid device id: {device_id!r}")
        account = self._tenant(tenant)
        user = new_user_key()
        token = user_jwt(account.devices_signer, user.public, device_id,
                         issuer_account=account.public, expires=expires, scoped=True)
        account.devices.setdefault(device_id, []).append(user.public)
        account.save_state()
        return token

    def _host_user(self, tenant: str, name: str, permissions: Permissions | None, expires: int | None,
                   bearer: bool) -> tuple[str, str]:
        # (JWT, seed) of a new host user of the tenant, signed by its users' key.
        account = self._tenant(tenant)
        user = new_user_key()
        token = user_jwt(account.users_signer, user.public, name, issuer_account=account.public,
                         permissions=permissions, bearer_token=bearer, expires=expires)
        return token, user.seed

    def issue_user(self, tenant: str, name: str, permissions: Permissions | None = None,
                   expires: int | None = None) -> str:
        """.creds text for a host component (gateway, cli); no permissions: the whole account."""
        return format_creds(*self._host_user(tenant, name, permissions, expires, bearer=False))

    def issue_bearer(self, tenant: str, name: str, permissions: Permissions | None = None,
                     expires: int | None = None) -> str:
        """A bearer JWT for a host component's MQTT connection (the gateway's):
        MQTT has no way to sign the server's nonce."""
        return self._host_user(tenant, name, permissions, expires, bearer=True)[0]

    def system_user_creds(self, name: str = "admin") -> str:
        """.creds for the system account: what pushes account JWT updates."""
        return self.issue_user(SYSTEM_TENANT, name)

    def revoke(self, tenant: str, device_id: str) -> str:
        """Revoke every JWT the device was issued; the newer account JWT to push."""
        account = self._tenant(tenant)
        keys = account.devices.get(device_id)
        if not keys:
            raise AuthorityError(f"no JWT was issued to device {device_id!r} in tenant {tenant!r}")
        now = int(time.time())
        for key in keys:
            account.revocations[key] = now
        return self._mint_account(account)

    def revoked(self, tenant: str, device_id: str) -> bool:
        account = self._tenant(tenant)
        keys = account.devices.get(device_id, [])
        return bool(keys) and all(key in account.revocations for key in keys)


async def push_account_jwt(nats_url: str, system_user_creds: str, token: str, timeout: float = 5.0) -> None:
    """Send an account JWT to the servers' full resolvers; raise unless one took it."""
    import nats
    from nats.aio.client import RawCredentials

    claims = decode_jwt(token)
    if claims.get("nats", {}).get("type") != "account":
        raise JwtError("only account JWTs are pushed to the resolver")
    nc = await nats.connect(nats_url, user_credentials=RawCredentials(system_user_creds),
                            allow_reconnect=False, connect_timeout=timeout)
    try:
        reply = await nc.request(CLAIMS_UPDATE_SUBJECT, token.encode(), timeout=timeout)
    finally:
        await nc.close()
    answer = json.loads(reply.data)
    error = answer.get("error")
    if error or answer.get("data", {}).get("code") != 200:
        raise AuthorityError(f"the resolver refused account {claims.get('name')!r}: {error or answer}")


__all__ = [
    "Authority",
    "AuthorityError",
    "CLAIMS_UPDATE_SUBJECT",
    "DEFAULT_TENANT",
    "SYSTEM_TENANT",
    "Tenant",
    "device_permissions",
    "device_template",
    "push_account_jwt",
]
