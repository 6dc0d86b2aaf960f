"""micro_http's side of Cloud Hypervisor's API socket: request framing and exact response bytes.

CH serves its API with firecracker's micro_http (cloud-hypervisor-api.md §1), which is not a
general HTTP/1.1 server, and clients see the difference:
- every response is `HTTP/1.1 <code> \\r\\n` with no reason phrase, then `Server`, `Connection:
  keep-alive`, and `Content-Type` + `Content-Length` unless the status is 204 or 100;
- errors found while *parsing* come from micro_http itself (`Server: Firecracker API`) with a
  body that is not JSON: `{ "error": "<msg>\\nAll previous unanswered requests will be dropped." }`;
- only GET, PUT, PATCH and DELETE parse; each request or header line, CRLF included, must fit
  micro_http's 1024-byte read buffer; the body limit is checked against `Content-Length` when the
  head ends; the body is framed by `Content-Length` alone (`Transfer-Encoding` is accepted and
  ignored) and `Content-Length: 0` means "no body";
- `Host` is not required, unlike RFC 7230 (and h11).

h11 does the HTTP parsing. `RequestParser` runs micro_http's own checks on each head first, in
micro_http's order and with its messages (micro_http `connection.rs`, `request.rs`,
`headers.rs`), then hands h11 the head without the two headers where h11 and micro_http disagree:
`Transfer-Encoding` is dropped and a missing `Host` is supplied. Responses are written here
rather than through h11 because h11 rewrites `Connection` to `close` for HTTP/1.0 or
`Connection: close` peers, and micro_http never does.
"""

from __future__ import annotations

from dataclasses import dataclass

import h11

CH_SERVER = "Cloud Hypervisor API"
MICRO_HTTP_SERVER = "Firecracker API"

# micro_http's fixed answer to an 11th simultaneous connection, sent before it drops the stream
# (micro_http server.rs:17-21).
SERVER_FULL = (
    b"HTTP/1.1 503\r\nServer: Firecracker API\r\nConnection: close\r\n"
    b'Content-Length: 40\r\n\r\n{ "error": "Too many open connections" }'
)
MAX_CONNECTIONS = 10

# micro_http's read buffer: a request line or a header line, CRLF included, must fit in it.
LINE_BUFFER = 1024
# micro_http has no limit on the number of header lines; the double needs one to stay bounded.
MAX_HEAD = 64 * 1024
METHODS = frozenset({b"GET", b"PUT", b"PATCH", b"DELETE"})
VERSIONS = frozenset({b"HTTP/1.0", b"HTTP/1.1"})


def encode_response(
    status: int, body: bytes | None, *, server: str = CH_SERVER, version: str = "HTTP/1.1"
) -> bytes:
    """micro_http's `Response::write_all`: a `None` body means no content headers at all."""
    head = f"{version} {status} \r\nServer: {server}\r\nConnection: keep-alive\r\n"
    if body is None:
        return f"{head}\r\n".encode()
    content = f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return (head + content).encode() + body


@dataclass(frozen=True)
class HttpRequest:
    """A request as CH's handlers see it."""

    method: str
    target: str
    body: bytes | None

    @property
    def path(self) -> str:
        """micro_http's `Uri::get_abs_path`: absolute-form targets lose scheme and host."""
        if self.target.startswith("http://"):
            rest = self.target[len("http://") :]
            slash = rest.find("/")
            return rest[slash:] if slash >= 0 else ""
        return self.target if self.target.startswith("/") else ""


@dataclass(frozen=True)
class ParseFailure:
    """A request micro_http rejected before CH saw it."""

    message: str

    def response(self) -> bytes:
        """The 400 micro_http sends; the literal newline makes the body invalid JSON (§3)."""
        body = (
            '{ "error": "' + self.message + '\nAll previous unanswered requests will be dropped." }'
        )
        return encode_response(400, body.encode(), server=MICRO_HTTP_SERVER)


@dataclass(frozen=True)
class Continue:
    """micro_http's interim answer to `Expect: 100-continue`, in the request's HTTP version."""

    version: str

    def response(self) -> bytes:
        """`HTTP/1.x 100 ` with micro_http's default server name and no content headers."""
        return encode_response(100, None, server=MICRO_HTTP_SERVER, version=self.version)


ParsedItem = HttpRequest | ParseFailure | Continue


class RequestParser:
    """Turns the bytes of one connection into requests, in order (pipelining included)."""

    def __init__(self, body_limit: int) -> None:
        self._body_limit = body_limit
        self._buffer = bytearray()
        self._discard = 0
        self._h11: h11.Connection | None = None
        self._method = ""
        self._target = ""
        self._body = bytearray()

    def feed(self, data: bytes) -> list[ParsedItem]:
        """Parse what `data` completes; partial requests wait for the next call."""
        self._buffer += data
        items: list[ParsedItem] = []
        while True:
            if self._discard:
                skipped = min(self._discard, len(self._buffer))
                del self._buffer[:skipped]
                self._discard -= skipped
                if self._discard:
                    return items
            if self._h11 is None and not self._start_request(items):
                return items
            if not self._read_body(items):
                return items

    def _start_request(self, items: list[ParsedItem]) -> bool:
        """Check and parse a complete head; False when more bytes are needed or it was bad."""
        end = self._buffer.find(b"\r\n\r\n")
        head = bytes(self._buffer if end < 0 else self._buffer[: end + 2])
        failure = _micro_http_head_failure(head, complete=end >= 0)
        if failure is None and end < 0 and len(self._buffer) > MAX_HEAD:
            failure = ParseFailure("Invalid request.")
        if failure is not None:
            # micro_http drops what it had buffered with the bad line.
            self._buffer.clear()
            items.append(failure)
            return False
        if end < 0:
            return False
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        conn.receive_data(_h11_head(head) + b"\r\n")
        rest = bytes(self._buffer[end + 4 :])
        self._buffer.clear()
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            items.append(ParseFailure("Invalid request."))
            return False
        assert isinstance(event, h11.Request)
        length = _content_length(event)
        if length > self._body_limit:
            items.append(
                ParseFailure(
                    f"Request payload with size {length} is larger than the limit of "
                    f"{self._body_limit} allowed by server."
                )
            )
            # micro_http would go on parsing the body as headers; the double skips it instead.
            self._buffer += rest
            self._discard = length
            return True
        if length and any(
            name == b"expect" and value.lower() == b"100-continue" for name, value in event.headers
        ):
            items.append(Continue(f"HTTP/{event.http_version.decode()}"))
        self._h11 = conn
        self._method = event.method.decode()
        self._target = event.target.decode()
        self._body = bytearray()
        self._buffer += rest
        return True

    def _read_body(self, items: list[ParsedItem]) -> bool:
        """Collect the body through h11; False when more bytes are needed."""
        conn = self._h11
        if conn is None:
            return True
        if self._buffer:
            # Never with b"": that is how h11 is told the peer hung up.
            conn.receive_data(bytes(self._buffer))
            self._buffer.clear()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                return False
            if isinstance(event, h11.Data):
                self._body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self._buffer += conn.trailing_data[0]
                self._h11 = None
                body = bytes(self._body) if self._body else None
                items.append(HttpRequest(self._method, self._target, body))
                return True


def _content_length(request: h11.Request) -> int:
    for name, value in request.headers:
        if name == b"content-length":
            return int(value)
    return 0


def _micro_http_head_failure(head: bytes, *, complete: bool) -> ParseFailure | None:
    """micro_http's checks on the lines of a head, in the order it makes them."""
    lines = head.split(b"\r\n")
    finished, partial = lines[:-1], lines[-1]
    for index, line in enumerate(finished):
        failure = _request_line_failure(line) if index == 0 else _header_line_failure(line)
        if failure is not None:
            return failure
    # An unfinished line that already fills micro_http's buffer can never end in it; a
    # 1023-byte one can, if its CR is the last byte and the LF comes next.
    too_long = len(partial) > LINE_BUFFER - 1 or (
        len(partial) == LINE_BUFFER - 1 and not partial.endswith(b"\r")
    )
    if not complete and too_long:
        if not finished:
            return ParseFailure("Invalid request.")
        return _header_too_long(partial)
    return None


def _request_line_failure(line: bytes) -> ParseFailure | None:
    if len(line) + 2 > LINE_BUFFER:
        return ParseFailure("Invalid request.")
    method, space, rest = line.partition(b" ")
    uri, space2, version = rest.partition(b" ")
    if not space or not space2:
        return ParseFailure("Invalid request.")
    if method not in METHODS:
        return ParseFailure("Invalid HTTP Method: Unsupported HTTP method.")
    if not uri:
        return ParseFailure("Invalid URI: Empty URI not allowed.")
    try:
        uri.decode()
    except UnicodeDecodeError:
        return ParseFailure("Invalid URI: Cannot parse URI as UTF-8.")
    if version not in VERSIONS:
        return ParseFailure("Invalid HTTP Version: Unsupported HTTP version.")
    return None


def _header_line_failure(line: bytes) -> ParseFailure | None:
    if len(line) + 2 > LINE_BUFFER:
        return _header_too_long(line + b"\r\n")
    try:
        text = line.decode()
    except UnicodeDecodeError:
        return ParseFailure("Invalid request.")
    name, colon, value = text.partition(":")
    if not colon:
        return ParseFailure(f"Invalid header. Reason: Header is incorrectly formatted. Key: {name}")
    if name.strip().lower() == "content-length":
        stripped = value.strip()
        if not stripped.isdigit() or not stripped.isascii() or int(stripped) >= 1 << 32:
            return ParseFailure(f"Invalid header. Reason: Invalid value. Key:{name}; Value:{value}")
    return None


def _header_too_long(buffered: bytes) -> ParseFailure:
    # micro_http quotes its whole 1024-byte buffer, which then holds the start of the line.
    quoted = buffered[:LINE_BUFFER].decode(errors="replace")
    return ParseFailure(f"Invalid header. Reason: Invalid content length. Header: {quoted}")


def _h11_head(head: bytes) -> bytes:
    """The head without `Transfer-Encoding` and with a `Host`, which micro_http does not need."""
    request_line, *headers = head.split(b"\r\n")[:-1]
    names = [header.partition(b":")[0].strip().lower() for header in headers]
    kept = [
        header for header, name in zip(headers, names, strict=True) if name != b"transfer-encoding"
    ]
    if b"host" not in names:
        kept.append(b"Host: localhost")
    return b"\r\n".join([request_line, *kept]) + b"\r\n"
