"""TLS in the node itself (``TLS_CERT``, ``TLS_KEY``): https:// and wss:// on the one port,
the certificate read again on SIGHUP (docs/operations/edge.md).

The listening socket keeps the context it was created with; a reload loads the files into a
new context, and the listening context's SNI callback, which OpenSSL runs for every
ClientHello (with or without a server name), hands each new connection the newest one.
Connections already open keep theirs. A reload that fails (a missing file, a key that does not
match, a half-written file) logs one line and keeps serving the certificate it had.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl

from polysignal.config import ConfigError

log = logging.getLogger("polysignal.server")


def _no_password() -> bytes:
    # An encrypted key fails to load instead of prompting on the terminal.
    return b""


def load_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context serving the PEM certificate chain ``cert`` with the key ``key``;
    ConfigError naming the setting when one cannot be used."""
    for name, path in (("TLS_CERT", cert), ("TLS_KEY", key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ConfigError(f"{name}: cannot read {path!r} ({exc.strerror})") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        raise ConfigError(_unusable(cert, key, exc)) from None
    return context


def _unusable(cert: str, key: str, exc: ssl.SSLError) -> str:
    """Which file OpenSSL refused (its "PEM lib" error names neither)."""
    if exc.reason == "KEY_VALUES_MISMATCH":
        return f"TLS_KEY: {key!r} is not the private key of the certificate in {cert!r}"
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert)
    except ssl.SSLError:
        return f"TLS_CERT: {cert!r} holds no PEM certificate"
    return f"TLS_KEY: {key!r} holds no PEM private key (or an encrypted one)"


class Tls:
    """The TLS of one listening socket: ``context`` to listen with, ``reload()`` on SIGHUP."""

    def __init__(self, cert: str, key: str) -> None:
        self.cert = cert
        self.key = key
        self.context = load_context(cert, key)
        self.context.sni_callback = self._pick
        self.current = self.context
        """The context new connections get: the newest that loaded."""
        self.reloads = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def _pick(self, connection: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        current = self.current
        if connection.context is not current:
            connection.context = current

    def reload(self) -> bool:
        """Read the files again; True when new connections get what they hold now."""
        try:
            context = load_context(self.cert, self.key)
        except ConfigError as exc:
            log.error("TLS reload failed, still serving the previous certificate: %s", exc)
            return False
        self.current = context
        self.reloads += 1
        log.info("TLS certificate reloaded from %s", self.cert)
        return True

    def watch(self) -> None:
        """Reload on SIGHUP (main thread only: elsewhere there is no signal to watch)."""
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        except (RuntimeError, ValueError):  # not the main thread
            return
        self._loop = loop

    def unwatch(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_signal_handler(signal.SIGHUP)
        self._loop = None
