"""API keys: who may call which method, and how fast (`mnist-serve --auth-keys FILE`).

The keys file is JSON (read and written with the standard library on every Python this
project supports, `keys add` rewrites it without a TOML writer, and `jq` or `kubectl create
secret --from-file` handle it as it is):

    {"keys": [
      {"name": "scorer", "role": "predict", "sha256": "<64 hex digits>",
       "requests_per_second": 100, "images_per_second": 50000}
    ]}

It holds the SHA-256 of each token, never the token. A caller presents the token as gRPC
metadata `authorization: Bearer <token>` or the HTTP header `Authorization: Bearer <token>`;
the per-call path (api/calls.py) asks `Authenticator.check` before the call's work, for
every method but the health ones. The key's name becomes the call's caller (the metrics'
`caller` label, the access log). The file is re-read when it changes (its mtime, size or
inode, looked at on a call at most once per RELOAD_INTERVAL): rotation needs no restart, and
a broken file keeps the previous keys and logs one line.

Per-key limits are token buckets in each process: with --workers N, each worker allows the
key's rates (docs/operations/auth.md).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

from . import metrics
from .call_context import Call
from .errors import PermissionDenied, RateLimited, Unauthenticated
from .logs import RateLimitedLog

logger = logging.getLogger(__name__)

Role = Literal["read", "predict"]
ROLES: tuple[Role, ...] = ("read", "predict")
ANONYMOUS = "anonymous"
# Health stays open for probes: grpc.health.v1 never reaches the call path, and these are
# v2's health methods (gRPC ServerLive/ServerReady, HTTP /v2/health/live and /ready).
OPEN_METHODS = frozenset({"ServerLive", "ServerReady"})
# What the read role covers: metadata, status, readiness, configuration, the model list.
# Every other method (each inference method, and anything added later) needs predict.
READ_METHODS = frozenset(
    {
        "GetModelMetadata",
        "GetModelStatus",
        "ServerMetadata",
        "ModelMetadata",
        "ModelReady",
        "ModelConfig",
        "ModelStatistics",
        "RepositoryIndex",
    }
)
AUTHORIZATION = "authorization"  # gRPC metadata key; HTTP headers match it in any case
RELOAD_INTERVAL = 1.0  # seconds between looks at the keys file
FAILURE_LOG_INTERVAL = 10.0  # seconds between log lines about refused calls, per reason
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
SHA256 = re.compile(r"[0-9a-f]{64}")
FIELDS = {"name", "role", "sha256", "requests_per_second", "images_per_second"}
TOKEN_PREFIX = "mnist_"  # lets secret scanners and people tell a token when they see one


class KeysFileError(ValueError):
    """The keys file cannot be used; the message says where and why (never a hash)."""


@dataclass(frozen=True, slots=True)
class Key:
    name: str
    role: Role
    digest: bytes  # sha256 of the token
    requests_per_second: float | None = None
    images_per_second: float | None = None


def needed_role(method: str) -> Role | None:
    """The role a method needs: None (open to anyone), read, or predict."""
    if method in OPEN_METHODS:
        return None
    return "read" if method in READ_METHODS else "predict"


def allows(role: Role, needed: Role) -> bool:
    return role == "predict" or needed == "read"


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_keys(text: str | bytes) -> dict[bytes, Key]:
    """The keys of a keys file's text, by token digest; KeysFileError when it is broken."""
    try:
        document = json.loads(text)
    except ValueError as error:
        raise KeysFileError(f"not valid JSON: {error}") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise KeysFileError('expected an object {"keys": [...]}')
    keys: dict[bytes, Key] = {}
    names: set[str] = set()
    for index, entry in enumerate(entries):
        key = _key_of(entry, f"keys[{index}]")
        if key.name in names:
            raise KeysFileError(f"keys[{index}]: name {key.name!r} is used twice")
        if key.digest in keys:
            raise KeysFileError(f"keys[{index}] ({key.name}): the same token as another key")
        names.add(key.name)
        keys[key.digest] = key
    return keys


def _key_of(entry: object, where: str) -> Key:
    if not isinstance(entry, dict):
        raise KeysFileError(f"{where}: expected an object")
    unknown = set(entry) - FIELDS
    if unknown:  # a misspelt limit would otherwise be no limit
        raise KeysFileError(f"{where}: unknown fields {sorted(unknown)}; known: {sorted(FIELDS)}")
    name = entry.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name) or name == ANONYMOUS:
        raise KeysFileError(
            f"{where}: name must be 1-63 letters, digits, '_', '.', '-' (not {ANONYMOUS!r})"
        )
    role = entry.get("role")
    if role not in ROLES:
        raise KeysFileError(f"{where} ({name}): role must be one of {list(ROLES)}")
    digest = entry.get("sha256")
    if not isinstance(digest, str) or not SHA256.fullmatch(digest):
        raise KeysFileError(f"{where} ({name}): sha256 must be 64 lower-case hex digits")
    limits = {}
    for field in ("requests_per_second", "images_per_second"):
        value = entry.get(field)
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value <= 0
        ):
            raise KeysFileError(f"{where} ({name}): {field} must be a positive number")
        limits[field] = None if value is None else float(value)
    return Key(name, role, bytes.fromhex(digest), **limits)


class Bucket:
    """A token bucket: `rate` per second, holding at most one second's worth (at least 1).

    A call that takes more than the bucket holds passes when the bucket is full and leaves
    it in debt, so a large batch is charged in full and the average rate holds."""

    __slots__ = ("capacity", "rate", "stamp", "tokens")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(rate, 1.0)
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def take(self, amount: float) -> float:
        """0 when `amount` is taken; else the seconds until it could be."""
        now = time.monotonic()
        tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        needed = min(amount, self.capacity)
        if tokens < needed:
            self.tokens = tokens
            return (needed - tokens) / self.rate
        self.tokens = tokens - amount
        return 0.0


class KeyLimits:
    """One key's buckets in this process."""

    __slots__ = ("images", "name", "requests")

    def __init__(self, key: Key) -> None:
        self.name = key.name
        self.requests = None if key.requests_per_second is None else Bucket(key.requests_per_second)
        self.images = None if key.images_per_second is None else Bucket(key.images_per_second)

    def same_rates(self, key: Key) -> bool:
        return (None if self.requests is None else self.requests.rate) == (
            key.requests_per_second
        ) and (None if self.images is None else self.images.rate) == key.images_per_second

    def take_request(self) -> None:
        if self.requests is not None:
            self._refuse_unless(self.requests.take(1), "requests", "requests_per_second")

    def take_images(self, count: int) -> None:
        if self.images is not None:
            self._refuse_unless(self.images.take(count), "images", "images_per_second")

    def _refuse_unless(self, wait: float, limit: str, field: str) -> None:
        if wait <= 0:
            return
        metrics.AUTH_FAILURES.labels("rate_limited").inc()
        metrics.RATE_LIMITED.labels(self.name, limit).inc()
        _failure_logs["rate_limited"].warning("call refused: key over its limit", caller=self.name)
        raise RateLimited(
            f"key {self.name!r} is over its {field}; retry in {wait * 1000:.0f} ms", wait
        )


_failure_logs = {
    reason: RateLimitedLog(logger, FAILURE_LOG_INTERVAL)
    for reason in ("missing", "unknown", "forbidden", "rate_limited")
}


class Authenticator:
    """The keys of one keys file, re-read when it changes, and each key's buckets."""

    def __init__(self, path: Path, metrics_auth: bool = False) -> None:
        self.path = path
        self.metrics_auth = metrics_auth
        self._signature = self._stat()
        try:
            self._keys = parse_keys(path.read_bytes())
        except (OSError, KeysFileError) as error:
            raise KeysFileError(f"keys file {path}: {error}") from None
        self._limits: dict[str, KeyLimits] = {}
        self._set_limits()
        self._next_look = time.monotonic() + RELOAD_INTERVAL
        self._bad_signature: tuple[int, int, int] | None = None

    @property
    def names(self) -> list[str]:
        return sorted(key.name for key in self._keys.values())

    def _stat(self) -> tuple[int, int, int]:
        try:
            stat = os.stat(self.path)
        except OSError:
            return (0, 0, 0)
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    def _set_limits(self) -> None:
        limits = {}
        for key in self._keys.values():
            kept = self._limits.get(key.name)
            limits[key.name] = kept if kept is not None and kept.same_rates(key) else KeyLimits(key)
        self._limits = limits

    def refresh(self, force: bool = False) -> None:
        """Re-read the file if it changed since the last look (looks at most once per
        RELOAD_INTERVAL unless forced). A broken file keeps the keys and logs one line."""
        now = time.monotonic()
        if not force and now < self._next_look:
            return
        self._next_look = now + RELOAD_INTERVAL
        signature = self._stat()
        if signature == self._signature or signature == self._bad_signature:
            return
        try:
            keys = parse_keys(self.path.read_bytes())
        except (OSError, KeysFileError) as error:
            self._bad_signature = signature
            logger.error(
                "keys file not reloaded; keeping the previous keys",
                extra={"file": str(self.path), "error": str(error), "keys": len(self._keys)},
            )
            return
        self._signature, self._bad_signature = signature, None
        self._keys = keys
        self._set_limits()
        logger.info("keys file reloaded", extra={"file": str(self.path), "keys": len(keys)})

    def identify(self, carrier: Mapping[str, str] | None) -> Key:
        """The key whose token the call carries; Unauthenticated if none."""
        self.refresh()
        value = None if carrier is None else carrier.get(AUTHORIZATION)
        if not value:
            self._fail("missing", "no token: send the header `Authorization: Bearer <token>`")
        scheme, _, token = value.strip().partition(" ")
        digest = token_digest(token.strip())
        key = self._keys.get(digest) if scheme.lower() == "bearer" else None
        if key is None or not hmac.compare_digest(key.digest, digest):
            self._fail("unknown", "the bearer token is not a valid key")
        return key

    def check(self, needed: Role, carrier: Mapping[str, str] | None, call: Call) -> None:
        """Admit `call` to a method that needs `needed`: its caller is the key's name (also
        when it is then refused), its limits the key's; Unauthenticated, PermissionDenied
        or RateLimited otherwise."""
        key = self.identify(carrier)
        call.caller = key.name
        if not allows(key.role, needed):
            metrics.AUTH_FAILURES.labels("forbidden").inc()
            _failure_logs["forbidden"].warning("call refused: role too narrow", caller=key.name)
            raise PermissionDenied(
                f"key {key.name!r} has role {key.role!r}; this method needs {needed!r}"
            )
        limits = self._limits[key.name]
        limits.take_request()
        if limits.requests is not None or limits.images is not None:
            call.limits = limits  # the core charges the images (call_context.admit_images)

    def _fail(self, reason: str, message: str) -> NoReturn:
        metrics.AUTH_FAILURES.labels(reason).inc()
        _failure_logs[reason].warning("call refused: not authenticated", reason=reason)
        raise Unauthenticated(message)


# `mnist-serve keys ...`: manage a keys file.


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def _read_document(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"keys": []}
    text = path.read_bytes()
    parse_keys(text)  # refuse to rewrite a broken file
    document: dict[str, Any] = json.loads(text)
    return document


def _write_document(path: Path, document: dict[str, Any]) -> None:
    """Replace the file at once (a server never reads half of it), readable by owner only."""
    text = json.dumps(document, indent=2) + "\n"
    parse_keys(text)
    handle, temporary = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def keys_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="mnist-serve keys", description="Manage an --auth-keys file (JSON)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser(
        "add", help="create a key; its token is printed once, on the last line"
    )
    add.add_argument("name")
    add.add_argument("--role", choices=ROLES, required=True)
    add.add_argument("--file", type=Path, required=True)
    add.add_argument("--requests-per-second", type=float)
    add.add_argument("--images-per-second", type=float)
    remove = commands.add_parser("remove", help="delete a key by name")
    remove.add_argument("name")
    remove.add_argument("--file", type=Path, required=True)
    listing = commands.add_parser("list", help="names, roles and limits (no hashes)")
    listing.add_argument("--file", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        document = _read_document(args.file)
    except (OSError, KeysFileError) as error:
        print(f"mnist-serve keys: {args.file}: {error}", file=sys.stderr)
        return 2
    entries: list[dict[str, Any]] = document["keys"]
    if args.command == "list":
        for listed in entries:
            extra = "".join(
                f" {field}={listed[field]:g}"
                for field in ("requests_per_second", "images_per_second")
                if listed.get(field) is not None
            )
            print(f"{listed['name']} {listed['role']}{extra}")
        return 0
    if args.command == "remove":
        kept = [entry for entry in entries if entry.get("name") != args.name]
        if len(kept) == len(entries):
            print(f"mnist-serve keys: no key named {args.name!r}", file=sys.stderr)
            return 1
        document["keys"] = kept
        _write_document(args.file, document)
        print(f"removed key {args.name!r} from {args.file}")
        return 0
    if any(entry.get("name") == args.name for entry in entries):
        print(f"mnist-serve keys: a key named {args.name!r} exists", file=sys.stderr)
        return 1
    token = new_token()
    entry: dict[str, Any] = {
        "name": args.name,
        "role": args.role,
        "sha256": token_digest(token).hex(),
    }
    for field in ("requests_per_second", "images_per_second"):
        value = getattr(args, field)
        if value is not None:
            entry[field] = int(value) if value == int(value) else value
    entries.append(entry)
    try:
        _write_document(args.file, document)
    except KeysFileError as error:
        print(f"mnist-serve keys: {error}", file=sys.stderr)
        return 2
    print(f"added key {args.name!r} (role {args.role}) to {args.file}")
    print("its token follows, shown this once; give it to the caller, it is not stored:")
    print(token)
    return 0
