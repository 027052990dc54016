"""HTTP access control: bearer tokens with scopes, and which route needs which.

The tokens file (``http.tokens_file``) holds one token per line, its scope first::

    # scope  token
    infer    3f9c1c0e6f0d4b7c9a1e2d3c4b5a6978
    admin    9a8b7c6d5e4f30211f2e3d4c5b6a7988

``infer`` may run inference; ``admin`` may do everything (model control, OTA,
rollback, the repository API, and inference). Blank lines and ``#`` comments are
skipped. The file is read again when it changes (checked at most once a second),
so a token is revoked by deleting its line. Only SHA-256 digests are kept in
memory, and tokens are compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import ssl
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from edged.errors import ConfigError, EdgedError

log = logging.getLogger(__name__)

MIN_TOKEN_LENGTH = 16
RELOAD_CHECK_S = 1.0


class Unauthorized(EdgedError):
    """No bearer token, or one that is not in the tokens file (HTTP 401)."""

    code = "unauthorized"


class Forbidden(EdgedError):
    """A valid token whose scope does not allow the request (HTTP 403)."""

    code = "forbidden"


class Access(Enum):
    """What a route needs."""

    PUBLIC = "public"  # health and metadata when http.public_health is on
    ANY_TOKEN = "any"  # health and metadata when http.public_health is off
    INFER = "infer"  # inference: scope infer or admin
    ADMIN = "admin"  # model control, OTA, rollback, repository: scope admin


SCOPES = ("infer", "admin")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(text: str, source: str) -> dict[bytes, str]:
    """Digest -> scope for every line of a tokens file; ConfigError names the bad line
    (never the token itself)."""
    tokens: dict[bytes, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ConfigError(f"{source} line {number}: expected 'SCOPE TOKEN' (scope infer or admin), got {len(parts)} fields")
        scope, token = parts
        if scope not in SCOPES:
            shown = repr(scope) if len(scope) < MIN_TOKEN_LENGTH else "(not shown: it may be a token)"
            raise ConfigError(f"{source} line {number}: unknown scope {shown}; the line is 'SCOPE TOKEN', scope infer or admin")
        if len(token) < MIN_TOKEN_LENGTH:
            raise ConfigError(f"{source} line {number}: token is shorter than {MIN_TOKEN_LENGTH} characters")
        tokens[_digest(token)] = scope
    if not tokens:
        raise ConfigError(f"{source}: no tokens (one 'SCOPE TOKEN' line each, scope infer or admin)")
    return tokens


@dataclass
class TokenStore:
    """The tokens of one file, re-read when the file changes."""

    path: Path
    _tokens: dict[bytes, str] = field(default_factory=dict)
    _mtime: float = -1.0
    _checked: float = 0.0

    @classmethod
    def load(cls, path: str | Path) -> "TokenStore":
        store = cls(Path(path))
        store._read()
        return store

    def _read(self) -> None:
        try:
            stat = self.path.stat()
            text = self.path.read_text()
        except OSError as exc:
            raise ConfigError(f"http.tokens_file {self.path}: cannot read: {exc.strerror or exc}") from None
        if stat.st_mode & 0o004:
            log.warning("http.tokens_file %s is readable by every user; chmod 600 it", self.path)
        self._tokens = parse_tokens(text, f"http.tokens_file {self.path}")
        self._mtime = stat.st_mtime

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_S:
            return
        self._checked = now
        try:
            mtime = self.path.stat().st_mtime
        except OSError:
            return  # keep the tokens we have; the next check tries again
        if mtime != self._mtime:
            try:
                self._read()
                log.info("http.tokens_file %s re-read: %d token(s)", self.path, len(self._tokens))
            except ConfigError as exc:
                log.error("%s; keeping the previous tokens", exc)
                self._mtime = mtime

    def scope_of(self, token: str) -> str | None:
        """The scope of ``token``, or None when it is unknown."""
        self._refresh()
        wanted = _digest(token)
        found: str | None = None
        for digest, scope in self._tokens.items():  # every entry, so the time does not say which matched
            if hmac.compare_digest(digest, wanted):
                found = scope
        return found


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header, else None."""
    if not header:
        return None
    kind, _, token = header.strip().partition(" ")
    if kind.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def check_access(store: TokenStore | None, access: Access, authorization: str | None) -> None:
    """Raise Unauthorized or Forbidden unless the request may go on.

    Without a token store (no http.tokens_file) everything is open."""
    if store is None or access is Access.PUBLIC:
        return
    token = bearer_token(authorization)
    if token is None:
        raise Unauthorized("this endpoint needs a token: send 'Authorization: Bearer TOKEN' (see http.tokens_file)")
    scope = store.scope_of(token)
    if scope is None:
        raise Unauthorized("the bearer token is not valid")
    if access is Access.ADMIN and scope != "admin":
        raise Forbidden("this endpoint needs a token with scope admin; this token has scope " + scope)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, tls: bool, tokens: bool, allow_insecure: bool) -> str | None:
    """Why listening on ``host`` is refused, or None when it is allowed.

    Loopback may listen without TLS or tokens; any other address needs both,
    unless http.allow_insecure is set."""
    if is_loopback(host) or (tls and tokens) or allow_insecure:
        return None
    missing = " and ".join(what for what, have in (("TLS (http.tls_cert_file, http.tls_key_file)", tls),
                                                    ("tokens (http.tokens_file)", tokens)) if not have)
    return (f"http.host {host!r} is not a loopback address, so it needs {missing}; "
            f"set http.allow_insecure = true to listen without them anyway")


def tls_context(cert_file: str, key_file: str, client_ca_file: str = "") -> ssl.SSLContext:
    """The server's TLS context (TLS 1.2+); with ``client_ca_file``, clients need a
    certificate signed by that CA (mutual TLS)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"http.tls_cert_file {cert_file} / http.tls_key_file {key_file}: cannot load: {exc}") from None
    if client_ca_file:
        try:
            context.load_verify_locations(cafile=client_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"http.tls_client_ca_file {client_ca_file}: cannot load: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context
