"""Mutual challenge-response authentication under the run secret.

The client proves first, then the server proves back::

    C->S HELLO(client nonce)   S->C CHALLENGE(server nonce)
    C->S PROOF(mac_client)     S->C AUTH_OK(mac_server) | ERROR + close

Both proofs are HMAC-SHA256 over both nonces and a role label, so every proof
is fresh for its connection and one side's proof cannot be reflected back as
the other's. The server reads only nonce- and MAC-sized frames before the
client has proved the secret.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
import socket

from gemini.cluster.transport.wire import (
    NONCE_BYTES,
    FrameType,
    TransportError,
    error_text,
    recv_frame,
    send_error,
    send_frame,
)

#: A run secret shorter than this is refused: HMAC is only as strong as its key.
MIN_SECRET_BYTES = 16
_AUTH_LABEL = b"gemini-transport/1 "


def check_secret(secret: bytes) -> None:
    if not isinstance(secret, bytes | bytearray) or len(secret) < MIN_SECRET_BYTES:
        raise ValueError(
            f"secret must be bytes of at least {MIN_SECRET_BYTES} bytes "
            "(e.g. secrets.token_bytes(32) shared by the run)"
        )


def auth_mac(secret: bytes, role: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """HMAC-SHA256 proof for ``role`` (b"client" or b"server").

    The role label keeps one side's proof from being reflected back as the
    other's; both nonces make every proof fresh for this connection.
    """
    msg = _AUTH_LABEL + role + b" " + client_nonce + server_nonce
    return hmac.new(secret, msg, hashlib.sha256).digest()


def client_handshake(sock: socket.socket, secret: bytes) -> None:
    """Prove the run secret to the server and check that it proves it back."""
    client_nonce = secrets.token_bytes(NONCE_BYTES)
    send_frame(sock, FrameType.HELLO, client_nonce)
    ftype, server_nonce = recv_frame(sock, {FrameType.CHALLENGE})
    if ftype == FrameType.ERROR:
        raise TransportError(
            f"auth failed: server refused the handshake: {error_text(server_nonce)}"
        )
    if len(server_nonce) != NONCE_BYTES:
        raise TransportError(f"auth failed: server nonce of {len(server_nonce)} bytes")
    send_frame(sock, FrameType.PROOF, auth_mac(secret, b"client", client_nonce, server_nonce))
    ftype, proof = recv_frame(sock, {FrameType.AUTH_OK})
    if ftype == FrameType.ERROR:
        raise TransportError(
            f"auth failed: server refused our proof ({error_text(proof)}; wrong run secret?)"
        )
    expected = auth_mac(secret, b"server", client_nonce, server_nonce)
    if not hmac.compare_digest(proof, expected):
        raise TransportError("auth failed: server did not prove the run secret")


def server_handshake(sock: socket.socket, secret: bytes) -> None:
    """Check the client's proof of the run secret, then prove it back."""
    # No ERROR frames from an unauthenticated peer: only 32-byte frames are
    # read before it proves the secret.
    _, client_nonce = recv_frame(sock, {FrameType.HELLO}, accept_error=False)
    if len(client_nonce) != NONCE_BYTES:
        raise TransportError(f"auth failed: client nonce of {len(client_nonce)} bytes")
    server_nonce = secrets.token_bytes(NONCE_BYTES)
    send_frame(sock, FrameType.CHALLENGE, server_nonce)
    _, proof = recv_frame(sock, {FrameType.PROOF}, accept_error=False)
    expected = auth_mac(secret, b"client", client_nonce, server_nonce)
    if not hmac.compare_digest(proof, expected):
        # Tell the peer why before hanging up; its error then names the cause.
        with contextlib.suppress(OSError):
            send_error(sock, "auth failed")
        raise TransportError("auth failed: client did not prove the run secret")
    send_frame(sock, FrameType.AUTH_OK, auth_mac(secret, b"server", client_nonce, server_nonce))
