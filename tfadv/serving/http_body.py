"""Reading a REST request's body off the wire: framing, size limits, decoding.

A body comes with `Content-Length` or `Transfer-Encoding: chunked`
(`chunks`), possibly compressed (`decompress`: gzip or deflate, stopped as
soon as the size limit is passed). `HTTPRefusal` carries the HTTP status of a
body refused for the way it was sent (400, 413, 415, 501), statuses outside
TF Serving's error codes. `peer_closed` tells whether a client has gone.
"""

from __future__ import annotations

import gzip
import io
import re
import select
import socket
import zlib

MB = 1 << 20


class HTTPRefusal(Exception):
    """A REST request refused for the way its body was sent (statuses outside TF's codes)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


_MAX_LINE = 65536  # longest chunk-size or trailer line
_MAX_TRAILERS = 100
PIECE = 1 << 20  # chunk data is read in pieces, whatever size a chunk claims
DRAIN_MAX_BYTES = 8 * MB  # a refused body up to this size is read and dropped ...
DRAIN_TIMEOUT_S = 2.0  # ... if it keeps arriving; otherwise the connection is closed
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")


def chunks(rfile):
    """Yields the data of a `Transfer-Encoding: chunked` body (RFC 9112 section 7.1)
    in pieces of at most 1 MB, then reads the trailer section.

    Raises:
        HTTPRefusal: 400 for a malformed or truncated body.
        OSError: when the connection fails or times out.
    """
    while True:
        line = rfile.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE or not line.endswith(b"\n"):
            raise HTTPRefusal(400, "The chunked request body ended early or has a chunk-size "
                                    "line longer than 64 KB.")
        size_text = line.split(b";", 1)[0].strip()
        if not _HEX.fullmatch(size_text):
            raise HTTPRefusal(400, f"Bad chunk size {size_text[:20]!r} in the chunked request "
                                    "body; expected hexadecimal digits.")
        size = int(size_text, 16)
        if size == 0:
            break
        while size:
            piece = rfile.read(min(size, PIECE))
            if not piece:
                raise HTTPRefusal(400, "The chunked request body ended inside a chunk.")
            size -= len(piece)
            yield piece
        if rfile.read(2) != b"\r\n":
            raise HTTPRefusal(400, "Chunk data in the request body is not followed by CRLF.")
    for _ in range(_MAX_TRAILERS):
        line = rfile.readline(_MAX_LINE + 1)
        if len(line) > _MAX_LINE or not line.endswith(b"\n"):
            raise HTTPRefusal(400, "The chunked request body ended inside its trailer section.")
        if line in (b"\r\n", b"\n"):
            return
    raise HTTPRefusal(400, f"The chunked request body has more than {_MAX_TRAILERS} trailer "
                            "lines.")


def too_big(limit_mb, what):
    return HTTPRefusal(413, f"The request body {what} more than the limit of {limit_mb} MB; "
                             "send fewer examples per request (or start the server with a "
                             "larger --max-message-mb).")


def decompress(body: bytes, codings: list, limit: int, limit_mb) -> bytes:
    """Undoes the request's Content-Encoding, stopping once `limit` bytes are passed.

    Raises:
        HTTPRefusal: 415 for an unknown coding, 413 when the decoded body is
            over the limit (it is never expanded further), 400 for bad data.
    """
    for coding in reversed(codings):
        if coding == "identity":
            continue
        try:
            if coding in ("gzip", "x-gzip"):
                with gzip.GzipFile(fileobj=io.BytesIO(body)) as f:
                    decoded = f.read(limit + 1)
            elif coding == "deflate":
                inflater = zlib.decompressobj()
                decoded = inflater.decompress(body, limit + 1)
                if len(decoded) <= limit and (not inflater.eof or inflater.unused_data):
                    raise zlib.error("truncated data or data after the end of the stream")
            else:
                raise HTTPRefusal(415, f"Content-Encoding {coding!r} is not supported; send "
                                        "the body uncompressed or with Content-Encoding: gzip.")
        except (OSError, EOFError, zlib.error) as err:
            raise HTTPRefusal(400, f"The request body is not valid {coding} data ({err}); "
                                    "compress it whole, or drop the Content-Encoding "
                                    "header.") from None
        if len(decoded) > limit:
            raise too_big(limit_mb, f"decompresses ({coding}) to")
        body = decoded
    return body


def header_list(headers, name):
    """The comma-separated values of every `name` header, lower-cased."""
    return [v.strip().lower() for line in headers.get_all(name, [])
            for v in line.split(",") if v.strip()]


def peer_closed(sock) -> bool:
    """Whether the client is gone: its connection was reset (or is no longer usable).

    A FIN alone is not "gone": HTTP allows a client to half-close after
    sending its request(s) and still read the answers (`nc -N`, pipelining
    tools), so end of stream is not a reason to drop a request. A reset
    (a client that aborted, or closed with unread data) is.
    """
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            events = poller.poll(0)
            if any(ev & (select.POLLERR | select.POLLNVAL) for _, ev in events):
                return True
            readable = bool(events)
        else:
            readable = bool(select.select([sock], [], [], 0)[0])
        if readable:
            # Peek at the TCP stream itself (TLS too): raises on a reset.
            socket.socket.recv(sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        return False
    except (BlockingIOError, InterruptedError):
        return False
    except (OSError, ValueError):
        return True

