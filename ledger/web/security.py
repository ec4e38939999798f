"""The console's safety layer: who may connect, and what a page may do in the browser.

* Loopback by default; a bind address that is not loopback is refused unless
  credentials are required (:func:`check_bind`).
* ``--auth`` is ``USER:PASSWORD`` (HTTP Basic, which browsers prompt for) or
  ``token:SECRET`` (``Authorization: Bearer SECRET``, or Basic with SECRET as
  the password so a browser can sign in too). Both sides are compared with
  :func:`hmac.compare_digest`, in constant time.
* Without credentials the server answers only requests whose ``Host`` is a
  loopback name (in any case), a loopback address (127.0.0.0/8, ::1) or the
  name it was told to listen on (which :func:`check_bind` found to be loopback):
  otherwise any web site could read the console through DNS rebinding (its own
  name resolving to 127.0.0.1).
* Every response carries a Content-Security-Policy that allows scripts, styles
  and connections from the console's own origin only: no inline script runs,
  so a stored value that got past escaping could still not execute.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import socket
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ledger.errors import BadAuth, UnsafeBind

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


@dataclass(frozen=True)
class Credentials:
    """What a client must present: a user and password, or a token (user None)."""

    user: str | None
    secret: str

    @classmethod
    def parse(cls, text: str) -> Credentials:
        user, sep, secret = text.partition(":")
        if not sep or not user or not secret:
            raise BadAuth("--auth must be USER:PASSWORD or token:SECRET (neither part empty)")
        return cls(None if user == "token" else user, secret)

    def accepts(self, authorization: str | None) -> bool:
        if not authorization:
            return False
        scheme, _, value = authorization.partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer" and self.user is None:
            return _same(value.strip(), self.secret)
        if scheme != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        if not sep:
            return False
        # Both compared every time (no early exit on a wrong user name).
        user_ok = True if self.user is None else _same(user, self.user)
        return _same(password, self.secret) & user_ok


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback address."""
    name = host.strip("[]")
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(name, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


def check_bind(host: str, credentials: Credentials | None) -> None:
    """Raise :class:`UnsafeBind` for a non-loopback ``host`` without credentials."""
    if credentials is None and not is_loopback(host):
        raise UnsafeBind(
            f"refusing to listen on {host} (not a loopback address) without --auth: "
            "anyone who can reach it could read every task's arguments and results"
        )


class Guard:
    """ASGI middleware: credentials (when set), the loopback Host check, security headers."""

    def __init__(self, app: ASGIApp, credentials: Credentials | None, bound: str | None = None) -> None:
        self.app = app
        self.credentials = credentials
        #: the loopback names a request may be addressed to (host names are case-insensitive)
        self.names = {*LOOPBACK_NAMES, *([_host_name(bound).lower()] if bound else [])}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if self.credentials is not None:
            if not self.credentials.accepts(headers.get("authorization")):
                await _plain(send, 401, "credentials required\n",
                             [(b"www-authenticate", b'Basic realm="celery-ledger"')])
                return
        elif not self.answers_to(headers.get("host", "")):
            await _plain(send, 403, "this console answers only to localhost without --auth\n")
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), *HEADERS])
            await send(message)

        await self.app(scope, receive, send_with_headers)


    def answers_to(self, host: str) -> bool:
        """Whether a request whose ``Host`` header is ``host`` is answered without credentials."""
        name = _host_name(host).lower()
        if name in self.names:
            return True
        try:  # an address names no one's domain: no rebinding through it
            return ipaddress.ip_address(name.strip("[]")).is_loopback
        except ValueError:
            return False


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def _plain(send: Send, status: int, text: str, extra: list | None = None) -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"text/plain; charset=utf-8"), *HEADERS, *(extra or [])],
    })
    await send({"type": "http.response.body", "body": text.encode()})
