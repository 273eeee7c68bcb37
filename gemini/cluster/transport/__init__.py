"""Authenticated, checksummed socket transport for replicated checkpoints.

This package owns the wire protocol between a trainer and the worker agents
that hold copies of its per-step checkpoint: the frame format, the mutual
challenge-response handshake, the put/get/list exchanges, the server that an
agent runs (:class:`TransportServer`) and the client a trainer uses
(:class:`TransportClient`). What an agent does with the bytes (shared-memory
slots, which step is complete) lives behind the :class:`Handler` and
:class:`PutTarget` protocols and is implemented elsewhere.

Security rules kept here: every connection proves knowledge of the run secret
in both directions before any request is read, and must do so within a few
seconds (an unauthenticated peer holds a connection slot no longer; at most
half the slots are unauthenticated, the oldest of them given up to a
newcomer); an authenticated connection left idle is closed; every frame's
payload carries an xxh3_64 checksum that the receiver verifies; lengths are
checked against per-frame limits before anything is allocated; control
payloads are JSON and data payloads raw bytes, so nothing received is ever
unpickled. There is no
encryption and no per-frame MAC: the secret authenticates who connects, the
checksums catch corruption; neither hides nor protects the bytes from someone
who can read or rewrite packets on the network.

Data path: the sender checksums and sends slices of the caller's buffer in
place; the receiver reads each chunk straight into the destination buffer
(the holder's shared-memory slot, or the caller's ``into``) and checksums it
as it lands. A bad chunk in a put is reported after the rest of the put has
been drained into the slot being aborted, so the connection stays usable.

Modules: ``wire`` (frames, checksums, limits, socket I/O), ``handshake``
(authentication), ``server`` (the holder's side) and ``client`` (the
trainer's side). Everything public is importable from this package.
"""

from gemini.cluster.transport.client import TransportClient
from gemini.cluster.transport.handshake import (
    MIN_SECRET_BYTES,
    auth_mac,
    client_handshake,
    server_handshake,
)
from gemini.cluster.transport.server import Handler, PutTarget, TransportServer
from gemini.cluster.transport.wire import (
    DEFAULT_CHUNK_BYTES,
    HEADER,
    MAGIC,
    MAX_CHUNK_BYTES,
    MAX_CONTROL_BYTES,
    MAX_MANIFEST_BYTES,
    NONCE_BYTES,
    VERSION,
    FrameType,
    TransportError,
    checksum,
    pack_header,
    recv_frame,
    send_frame,
)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "HEADER",
    "MAGIC",
    "MAX_CHUNK_BYTES",
    "MAX_CONTROL_BYTES",
    "MAX_MANIFEST_BYTES",
    "MIN_SECRET_BYTES",
    "NONCE_BYTES",
    "VERSION",
    "FrameType",
    "Handler",
    "PutTarget",
    "TransportClient",
    "TransportError",
    "TransportServer",
    "auth_mac",
    "checksum",
    "client_handshake",
    "pack_header",
    "recv_frame",
    "send_frame",
    "server_handshake",
]
