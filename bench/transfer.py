"""
Move a large body through an HTTP endpoint and time it: an upload of N
zero bytes with a Content-Length (``POST``), or a download read to the end
(Content-Length or chunked framing).

Plain blocking sockets, 1 MiB at a time, so the client is never the
bottleneck.  Prints one JSON object: bytes moved, seconds, MiB/s, status,
and for an upload the byte count the upstream sink reports.
"""

import argparse
import json
import socket
import sys
import time
from urllib.parse import urlsplit

_PIECE = 1 << 20


def _connect(url: str, timeout: float):
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        sys.exit("loopback URLs only")
    sock = socket.create_connection((parts.hostname, parts.port or 80), timeout=timeout)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    return sock, parts.netloc, target


def _read_head(sock, buf: bytearray):
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed before the response headers")
        buf += data
    end = buf.index(b"\r\n\r\n")
    head = bytes(buf[:end])
    del buf[: end + 4]
    status = int(head.split(b" ", 2)[1])
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


def _read_body(sock, buf: bytearray, headers: dict, keep: int) -> tuple:
    """
    :return: (body length, the first C{keep} bytes of the body).
    """
    kept = bytearray()
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        total = 0
        while True:
            while b"\r\n" not in buf:
                buf += sock.recv(_PIECE)
            end = buf.index(b"\r\n")
            size = int(bytes(buf[:end]).split(b";")[0], 16)
            del buf[: end + 2]
            if size == 0:
                return total, bytes(kept)
            while len(buf) < size + 2:
                data = sock.recv(_PIECE)
                if not data:
                    raise ConnectionError("closed mid-chunk")
                buf += data
            if len(kept) < keep:
                kept += buf[: keep - len(kept)]
            total += size
            del buf[: size + 2]
    length = int(headers.get(b"content-length", b"-1"))
    total = len(buf)
    kept += buf[:keep]
    view = memoryview(bytearray(_PIECE))
    while length < 0 or total < length:
        n = sock.recv_into(view)
        if n == 0:
            if length < 0:
                break
            raise ConnectionError(f"closed after {total} of {length} bytes")
        if len(kept) < keep:
            kept += view[: min(n, keep - len(kept))]
        total += n
    return total, bytes(kept)


def upload(url: str, size: int, auth: str, timeout: float) -> dict:
    """
    POST C{size} zero bytes to C{url}.
    """
    sock, host, target = _connect(url, timeout)
    head = [f"POST {target} HTTP/1.1", f"Host: {host}", "Content-Type: application/octet-stream", f"Content-Length: {size}"]
    if auth:
        head.append(f"Authorization: Bearer {auth}")
    started = time.monotonic()
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    piece = bytes(_PIECE)
    left = size
    with sock:
        try:
            while left:
                n = min(left, _PIECE)
                sock.sendall(piece if n == _PIECE else piece[:n])
                left -= n
        except OSError as e:
            # The proxy may answer (413, 401) and close before taking it all.
            sent_error = str(e)
        else:
            sent_error = None
        buf = bytearray()
        status, headers = _read_head(sock, buf)
        _, body = _read_body(sock, buf, headers, 4096)
    seconds = time.monotonic() - started
    try:
        received = json.loads(body).get("received")
    except ValueError:
        received = None
    return {
        "direction": "upload",
        "status": status,
        "bytes": size - left,
        "received_by_upstream": received,
        "ok": status == 200 and received == size,
        "seconds": round(seconds, 3),
        "mib_per_s": round((size - left) / seconds / 2**20, 1),
        "send_error": sent_error,
        "answer": body[:300].decode("utf-8", "replace") if status != 200 else None,
    }


def download(url: str, size: int, auth: str, timeout: float) -> dict:
    """
    GET C{url} and read the body to its end.
    """
    sock, host, target = _connect(url, timeout)
    head = [f"GET {target} HTTP/1.1", f"Host: {host}"]
    if auth:
        head.append(f"Authorization: Bearer {auth}")
    started = time.monotonic()
    with sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        buf = bytearray()
        status, headers = _read_head(sock, buf)
        total, body = _read_body(sock, buf, headers, 300)
    seconds = time.monotonic() - started
    return {
        "direction": "download",
        "status": status,
        "bytes": total,
        "ok": status == 200 and total == size,
        "seconds": round(seconds, 3),
        "mib_per_s": round(total / seconds / 2**20, 1),
        "answer": body.decode("utf-8", "replace") if status != 200 else None,
    }


def main(argv=None) -> int:
    """
    Command line entry point.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("direction", choices=["upload", "download"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--bytes", type=int, required=True)
    parser.add_argument("--auth", default="")
    parser.add_argument("--timeout", type=float, default=120.0, help="socket timeout, seconds")
    args = parser.parse_args(argv)
    run = upload if args.direction == "upload" else download
    try:
        result = run(args.url, args.bytes, args.auth, args.timeout)
    except (OSError, ValueError) as e:
        result = {"direction": args.direction, "ok": False, "error": f"{type(e).__name__}: {e}"}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
