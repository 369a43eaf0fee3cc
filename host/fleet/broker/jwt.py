"""NATS decentralized auth: NKeys, and the JWTs that nats-server trusts in operator mode.

Written here rather than depending on a JWT library: the claims are small
JSON documents (nats-io/jwt v2 layout), signed with the `nkeys` package.
An operator signs accounts, an account (or one of its signing keys) signs
users; the server only holds the operator JWT and looks accounts up.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import nacl.exceptions
import nacl.signing
import nkeys  # pyright: ignore[reportMissingTypeStubs]

KeyKind = Literal["operator", "account", "user"]
Claims = dict[str, Any]

_PREFIXES: dict[KeyKind, int] = {
    "operator": nkeys.PREFIX_BYTE_OPERATOR,
    "account": nkeys.PREFIX_BYTE_ACCOUNT,
    "user": nkeys.PREFIX_BYTE_USER,
}
_FIRST_LETTER: dict[KeyKind, str] = {"operator": "O", "account": "A", "user": "U"}
_HEADER: Claims = {"typ": "JWT", "alg": "ed25519-nkey"}
# Limits of -1 mean "unlimited" to nats-server; 0 would mean "none allowed".
NO_LIMIT = -1


class JwtError(ValueError):
    pass


@dataclass(frozen=True)
class NKey:
    """A key pair: the seed is the secret, the public key is the identity."""

    seed: str = field(repr=False)
    public: str

    @property
    def kind(self) -> KeyKind:
        return kind_of(self.public)

    def sign(self, data: bytes) -> bytes:
        pair: Any = nkeys.from_seed(self.seed.encode())
        return bytes(pair.sign(data))


def kind_of(public_key: str) -> KeyKind:
    for kind, letter in _FIRST_LETTER.items():
        if public_key.startswith(letter):
            return kind
    raise JwtError(f"not an operator, account or user public key: {public_key[:8]}...")


def new_key(kind: KeyKind) -> NKey:
    # nkeys 0.2.1 cannot generate keys; a seed is 32 random bytes, encoded.
    seed: bytes = nkeys.encode_seed(os.urandom(32), _PREFIXES[kind])
    return key_from_seed(seed.decode())


def new_operator_key() -> NKey:
    return new_key("operator")


def new_account_key() -> NKey:
    return new_key("account")


def new_user_key() -> NKey:
    return new_key("user")


def key_from_seed(seed: str) -> NKey:
    try:
        pair: Any = nkeys.from_seed(seed.strip().encode())
        public = bytes(pair.public_key).decode()
    except (nkeys.NkeysError, binascii.Error, ValueError) as e:
        raise JwtError("not a valid NKey seed") from e
    return NKey(seed.strip(), public)


def verify_signature(public_key: str, data: bytes, signature: bytes) -> bool:
    """Whether `signature` over `data` was made by the key named `public_key`."""
    try:
        raw = base64.b32decode(public_key)
    except (binascii.Error, ValueError):
        return False
    # One prefix byte, 32 key bytes, a 2-byte CRC16.
    if len(raw) != 35 or nkeys.crc16(bytearray(raw[:-2])) != int.from_bytes(raw[-2:], "little"):
        return False
    try:
        nacl.signing.VerifyKey(raw[1:33]).verify(data, signature)
        return True
    except nacl.exceptions.BadSignatureError:
        return False


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def encode_jwt(claims: Claims, signer: NKey, issued_at: int | None = None) -> str:
    """Sign `claims` as `signer`: sets iss, iat and jti (the hash of the rest)."""
    body = dict(claims)
    body["iss"] = signer.public
    body["iat"] = int(time.time()) if issued_at is None else issued_at
    body.pop("jti", None)
    digest = hashlib.sha256(_json(body)).digest()
    body = {"jti": base64.b32encode(digest).rstrip(b"=").decode(), **body}
    signing_input = f"{_b64(_json(_HEADER))}.{_b64(_json(body))}"
    return f"{signing_input}.{_b64(signer.sign(signing_input.encode()))}"


def decode_jwt(token: str, verify: bool = True) -> Claims:
    """The claims of a JWT; with `verify`, only when `iss` signed it."""
    parts = token.strip().split(".")
    if len(parts) != 3:
        raise JwtError("a JWT has three dot-separated parts")
    try:
        header = json.loads(_unb64(parts[0]))
        body: Any = json.loads(_unb64(parts[1]))
        signature = _unb64(parts[2])
    except (binascii.Error, ValueError) as e:
        raise JwtError("JWT parts are not base64url JSON") from e
    if header != _HEADER:
        raise JwtError(f"not a NATS v2 JWT header: {header}")
    if not isinstance(body, dict):
        raise JwtError("JWT claims are not an object")
    claims = cast(Claims, body)
    if verify and not verify_signature(str(claims.get("iss", "")), f"{parts[0]}.{parts[1]}".encode(), signature):
        raise JwtError("JWT signature does not verify against its issuer")
    return claims


def _claims(subject: str, name: str, kind: str, nats: Claims, expires: int | None) -> Claims:
    claims: Claims = {"name": name, "sub": subject}
    if expires is not None:
        claims["exp"] = expires
    claims["nats"] = {**nats, "type": kind, "version": 2}
    return claims


def operator_jwt(
    operator: NKey,
    name: str,
    system_account: str | None = None,
    signing_keys: Sequence[str] = (),
) -> str:
    """The self-signed operator JWT: the root of trust the server is configured with."""
    nats: Claims = {}
    if system_account:
        nats["system_account"] = system_account
    if signing_keys:
        nats["signing_keys"] = list(signing_keys)
    return encode_jwt(_claims(operator.public, name, "operator", nats, None), operator)


@dataclass(frozen=True)
class Permissions:
    """Subjects a user may publish and subscribe to; empty lists leave that side open."""

    pub_allow: Sequence[str] = ()
    pub_deny: Sequence[str] = ()
    sub_allow: Sequence[str] = ()
    sub_deny: Sequence[str] = ()

    def claims(self) -> Claims:
        def side(allow: Sequence[str], deny: Sequence[str]) -> Claims:
            out: Claims = {}
            if allow:
                out["allow"] = list(allow)
            if deny:
                out["deny"] = list(deny)
            return out

        return {"pub": side(self.pub_allow, self.pub_deny), "sub": side(self.sub_allow, self.sub_deny)}


def user_limits(
    permissions: Permissions | None = None,
    bearer_token: bool = False,
    connection_types: Sequence[str] = (),
) -> Claims:
    """A user's permissions and limits (jwt's UserPermissionLimits), also a scope's template."""
    limits: Claims = {**(permissions or Permissions()).claims()}
    limits.update(subs=NO_LIMIT, data=NO_LIMIT, payload=NO_LIMIT)
    if bearer_token:
        limits["bearer_token"] = True
    if connection_types:
        limits["allowed_connection_types"] = list(connection_types)
    return limits


@dataclass(frozen=True)
class UserScope:
    """An account signing key whose users get `template` instead of their own permissions.

    Template subjects may use {{name()}}, {{subject()}}, {{tag(x)}}, filled in
    by the server from each user JWT when it connects.
    """

    key: str
    role: str
    template: Claims
    description: str = ""

    def claims(self) -> Claims:
        out: Claims = {"kind": "user_scope", "key": self.key, "role": self.role, "template": self.template}
        if self.description:
            out["description"] = self.description
        return out


def jetstream_limits() -> Claims:
    """Account limits with JetStream on and unlimited (MQTT sessions live in JetStream)."""
    return {
        "subs": NO_LIMIT,
        "data": NO_LIMIT,
        "payload": NO_LIMIT,
        "imports": NO_LIMIT,
        "exports": NO_LIMIT,
        "wildcards": True,
        "conn": NO_LIMIT,
        "leaf": NO_LIMIT,
        "mem_storage": NO_LIMIT,
        "disk_storage": NO_LIMIT,
        "streams": NO_LIMIT,
        "consumer": NO_LIMIT,
        "max_ack_pending": NO_LIMIT,
    }


def account_jwt(
    issuer: NKey,
    account: str,
    name: str,
    jetstream: bool = True,
    signing_keys: Sequence[str | UserScope] = (),
    revocations: Mapping[str, int] | None = None,
    issued_at: int | None = None,
    expires: int | None = None,
) -> str:
    """An account JWT signed by the operator (or an operator signing key).

    `revocations` maps user public keys to a unix time: that user's JWTs
    issued at or before it are refused, and its live connections dropped.
    """
    limits = jetstream_limits()
    if not jetstream:
        # 0 storage turns JetStream off for the account (the system account).
        limits.update(mem_storage=0, disk_storage=0, streams=0, consumer=0)
    nats: Claims = {"limits": limits, "default_permissions": {"pub": {}, "sub": {}}}
    if signing_keys:
        nats["signing_keys"] = [key if isinstance(key, str) else key.claims() for key in signing_keys]
    if revocations:
        nats["revocations"] = dict(revocations)
    return encode_jwt(_claims(account, name, "account", nats, expires), issuer, issued_at)


def user_jwt(
    issuer: NKey,
    user: str,
    name: str,
    issuer_account: str | None = None,
    permissions: Permissions | None = None,
    bearer_token: bool = False,
    expires: int | None = None,
    scoped: bool = False,
) -> str:
    """A user JWT signed by its account, or by an account signing key.

    When the signer is not the account key itself, `issuer_account` names the
    account. A scoped signer's users must carry no permissions or limits at
    all (the server refuses them otherwise) and get the scope's template.
    """
    if issuer.kind != "account":
        raise JwtError("users are signed by an account key or an account signing key")
    nats: Claims = {}
    if scoped:
        if permissions is not None or bearer_token:
            raise JwtError("a user of a scoped signing key carries no permissions; its scope's template has them")
    else:
        nats.update(user_limits(permissions, bearer_token))
    if issuer_account and issuer_account != issuer.public:
        nats["issuer_account"] = issuer_account
    return encode_jwt(_claims(user, name, "user", nats, expires), issuer)


_CREDS = """-----BEGIN NATS USER JWT-----
{jwt}
------END NATS USER JWT------

************************* IMPORTANT *************************
NKEY Seed printed below can be used to sign and prove identity.
NKEYs are sensitive and should be treated as secrets.

-----BEGIN USER NKEY SEED-----
{seed}
------END USER NKEY SEED------

*************************************************************
"""
_CREDS_BLOCK = re.compile(r"\s*(?:-{3,}[^\n]*-{3,}\n)([\w\-.=]+)\s*\n\s*(?:-{3,}[^\n]*-{3,})")


def format_creds(jwt: str, seed: str) -> str:
    """The standard .creds layout nats clients read (user JWT, then its seed)."""
    return _CREDS.format(jwt=jwt, seed=seed)


def parse_creds(text: str) -> tuple[str, str]:
    """(jwt, seed) from a .creds file's text."""
    blocks = _CREDS_BLOCK.findall(text)
    if len(blocks) < 2:
        raise JwtError("not a NATS .creds file: needs a JWT block and a seed block")
    return str(blocks[0]), str(blocks[1])


def write_secret(path: Path, text: str) -> Path:
    """Write a file only its owner can read, created with that mode (never briefly wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


__all__ = [
    "Claims",
    "JwtError",
    "KeyKind",
    "NKey",
    "NO_LIMIT",
    "Permissions",
    "UserScope",
    "account_jwt",
    "decode_jwt",
    "encode_jwt",
    "format_creds",
    "jetstream_limits",
    "key_from_seed",
    "kind_of",
    "new_account_key",
    "new_key",
    "new_operator_key",
    "new_user_key",
    "operator_jwt",
    "parse_creds",
    "user_jwt",
    "user_limits",
    "verify_signature",
    "write_secret",
]
