"""Serve a ``Pi05Policy`` over openpi's websocket protocol, so that a robot's openpi client
(``openpi_client.websocket_client_policy.WebsocketClientPolicy``) talks to it unchanged.

The protocol, as openpi's policy server speaks it: on connect the server sends its metadata;
then for each binary message (an observation) it answers with the policy's output dict plus
``"server_timing"`` (``infer_ms``, and after the first ``prev_total_ms``: the previous message's
wait, inference and answer). Messages are msgpack,
numpy arrays as ``{"__ndarray__": True, "data": bytes, "dtype": str, "shape": list}`` maps and
numpy scalars as ``{"__npgeneric__": True, "data": value, "dtype": str}``. On an error the
server sends the traceback as a text message and closes the connection with code 1011 (the
client raises it). ``GET /healthz`` answers 200.

    python -m pi05_fastprune serve --checkpoint DIR --tokenizer paligemma_tokenizer.model \\
        --port 8000 --token-prune-keep-ratio 0.75

Needs the ``websockets`` and ``msgpack`` packages (only this module does).
"""

from __future__ import annotations

import http
import logging
import threading
import time
import traceback
from typing import Any, Optional

import numpy as np

__all__ = ["packb", "unpackb", "PolicyServer"]

log = logging.getLogger("pi05_fastprune.serve")


def _msgpack():
    try:
        import msgpack
    except ImportError as e:
        raise ImportError("serving needs msgpack: pip install msgpack websockets") from e
    return msgpack


def _encode(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in "VOc":
        raise ValueError(f"cannot send numpy dtype {obj.dtype} (structured, object or complex)")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    return obj


def _decode(obj: dict) -> Any:
    if b"__ndarray__" in obj:
        return np.ndarray(buffer=obj[b"data"], dtype=np.dtype(obj[b"dtype"]), shape=obj[b"shape"])
    if b"__npgeneric__" in obj:
        return np.dtype(obj[b"dtype"]).type(obj[b"data"])
    return obj


def packb(obj: Any) -> bytes:
    """msgpack bytes of ``obj`` (dicts, lists, str, numbers, numpy arrays and scalars)."""
    return _msgpack().packb(obj, default=_encode)


def unpackb(data: bytes) -> Any:
    """The object ``packb`` (or openpi's client) packed; numpy arrays come back read-only."""
    return _msgpack().unpackb(data, object_hook=_decode)


class PolicyServer:
    """Answers observations with ``policy.infer`` (one at a time: the model is not shared
    between concurrent calls), over websocket connections on ``host:port`` (port 0: a free
    one, see ``port``). ``serve_forever()`` blocks; ``shutdown()`` stops it from another thread."""

    def __init__(self, policy, host: str = "0.0.0.0", port: int = 8000, metadata: Optional[dict] = None):
        try:
            from websockets.sync.server import serve
        except ImportError as e:
            raise ImportError("serving needs websockets (>= 13): pip install websockets msgpack") from e
        self.policy = policy
        self.metadata = dict(metadata or {})
        self._lock = threading.Lock()
        self._server = serve(self._handle, host, port, compression=None, max_size=None,
                             process_request=self._health_check)

    @property
    def port(self) -> int:
        return self._server.socket.getsockname()[1]

    def serve_forever(self) -> None:
        log.info("serving on port %d", self.port)
        self._server.serve_forever()

    def shutdown(self) -> None:
        self._server.shutdown()

    @staticmethod
    def _health_check(connection, request):
        if request.path == "/healthz":
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        return None  # a websocket handshake

    def _handle(self, connection) -> None:
        from websockets.exceptions import ConnectionClosed

        connection.send(packb(self.metadata))
        prev_total_ms = None
        while True:
            # As openpi's server: prev_total_ms spans the wait for the next message too (the
            # robot's loop period), from one recv to the next answer.
            start = time.monotonic()
            try:
                message = connection.recv()
            except ConnectionClosed:
                return
            try:
                obs = unpackb(message)
                with self._lock:
                    infer_start = time.monotonic()
                    out = self.policy.infer(obs)
                    infer_ms = (time.monotonic() - infer_start) * 1e3
                out["server_timing"] = {"infer_ms": infer_ms}
                if prev_total_ms is not None:
                    out["server_timing"]["prev_total_ms"] = prev_total_ms
                connection.send(packb(out))
            except ConnectionClosed:
                return
            except Exception:
                log.exception("inference failed")
                connection.send(traceback.format_exc())
                connection.close(code=1011, reason="Internal server error. Traceback included in previous frame.")
                return
            prev_total_ms = (time.monotonic() - start) * 1e3
