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

Data path: a put is opened, fed ranges of the slot in order at the
sender's pace, and finished (:class:`PutStream`); the one-call ``put`` is
the same three steps. The sender sends slices of its buffer in place and
hands over the per-chunk digests the snapshot already computed; the holder
lands each range straight in its slot (or, on request, through staging
sub-buffers, see ``ranges``), hashes each piece while it is in cache, and
commits only after FINISH and a match of every digest. A mismatch is
reported at FINISH with the connection still usable; a put that is
abandoned, cut off or never finished is aborted and never complete.

Modules: ``wire`` (frames, checksums, limits, socket I/O), ``handshake``
(authentication), ``ranges`` (how the holder lands a put's ranges),
``server`` (the holder's side) and ``client`` (the trainer's side).
Everything public is importable from this package.
"""

from gemini.cluster.transport.client import PutStream, TransportClient
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
    MAX_SUBBUFFERS,
    NONCE_BYTES,
    VERSION,
    FrameType,
    GridHasher,
    Refused,
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
    "MAX_SUBBUFFERS",
    "MIN_SECRET_BYTES",
    "NONCE_BYTES",
    "VERSION",
    "FrameType",
    "GridHasher",
    "Handler",
    "PutStream",
    "PutTarget",
    "Refused",
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
