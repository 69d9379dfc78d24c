"""An OpenAI-compatible HTTP API on a running `Router` (standard library only): /v1/models,
/v1/completions, /v1/chat/completions (whole or as server-sent events) and /health.

One thread per connection; each request is one `Router.submit`. A request ends with `handle.cancel()`
whatever happened, so a client that leaves (seen when a write fails, or its socket reads as closed)
frees its KV at the router's next step. The schema lives in openai_protocol.py.
"""

from __future__ import annotations

import json
import logging
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from specserve.errors import SpecserveError
from specserve.router.core import RequestHandle, Router, RouterOutput
from specserve.router.openai_protocol import ApiError, Reply, parse_request

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 << 20
TLS_HANDSHAKE_S = 10.0  # an HTTPS client gets this long to finish its TLS handshake


class ClientGone(Exception):
    """The client closed its connection before the answer was complete."""


def merged(handles: list[RequestHandle]) -> Iterator[tuple[int, RouterOutput]]:
    """(index, output) of all handles as they come, until each has finished; the first failure raises."""
    if len(handles) == 1:
        yield from ((0, output) for output in handles[0])
        return
    events: queue.Queue = queue.Queue()

    def pump(index: int, handle: RequestHandle) -> None:
        try:
            for output in handle:
                events.put((index, output))
        except BaseException as exc:  # handed to the reader, which raises it
            events.put((index, exc))

    for index, handle in enumerate(handles):
        threading.Thread(target=pump, args=(index, handle), daemon=True).start()
    running = len(handles)
    while running:
        index, item = events.get()
        if isinstance(item, BaseException):
            raise item
        yield index, item
        running -= item.finished


class OpenAIServer(ThreadingHTTPServer):
    """With `ssl_context`, HTTPS: each connection's TLS handshake runs in its own thread (a client that
    stalls it holds only that thread, for at most TLS_HANDSHAKE_S)."""

    daemon_threads = True

    def __init__(self, router: Router, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), OpenAIHandler)
        self.router = router
        self.started = int(time.time())
        self.ssl_context = ssl_context

    def finish_request(self, request: socket.socket, client_address: tuple) -> None:
        if self.ssl_context is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(TLS_HANDSHAKE_S)
        try:
            secure = self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:  # not TLS, a refused client certificate, a stall
            log.info("TLS handshake with %s failed: %s", client_address[0], exc)
            return
        secure.settimeout(None)
        try:
            super().finish_request(secure, client_address)
        finally:
            secure.close()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def shutdown(self) -> None:
        """Stop accepting and close the listening socket; requests in flight run to their end."""
        super().shutdown()
        self.server_close()


def start_openai_http(router: Router, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> OpenAIServer:
    """Serve `router` (already started) on host:port (0 picks a free port) from a background thread; HTTPS
    with `ssl_context`."""
    server = OpenAIServer(router, host, port, ssl_context)
    threading.Thread(target=server.serve_forever, name="openai-http", daemon=True).start()
    log.info("OpenAI HTTP API on %s:%d", host, server.port)
    return server


class OpenAIHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every answer has a length or is chunked
    server: OpenAIServer

    def handle(self) -> None:
        try:
            super().handle()
        except ConnectionError:  # a client that drops a kept-alive connection between requests is no error
            self.close_connection = True

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _routes(self, path: str) -> dict[str, Callable[[], None]]:
        """method -> handler of `path`; empty when no such path."""
        if path == "/health":
            return {"GET": self._health}
        if path == "/v1/models" or path.startswith("/v1/models/"):
            return {"GET": lambda: self._models(path.removeprefix("/v1/models").removeprefix("/"))}
        if path == "/v1/completions":
            return {"POST": lambda: self._generate(chat=False)}
        if path == "/v1/chat/completions":
            return {"POST": lambda: self._generate(chat=True)}
        return {}

    def _dispatch(self, method: str) -> None:
        path = urlsplit(self.path).path
        routes = self._routes(path)
        try:
            if method not in routes:
                self.close_connection = True  # any body stays unread
            if not routes:
                raise ApiError(404, f"no such path: {path}", code="not_found")
            if method not in routes:
                raise ApiError(405, f"{path} takes {', '.join(routes)}, not {method}", code="method_not_allowed")
            routes[method]()
        except (ClientGone, ConnectionError):
            self.close_connection = True
        except Exception as exc:  # our own bugs get an answer too, not a dropped connection
            if not isinstance(exc, (ApiError, SpecserveError)):
                log.exception("%s %s failed", method, path)
            error = ApiError.answering(exc)
            self._send_json(error.status, error.body())

    # ---- endpoints --------------------------------------------------------------------------------

    def _health(self) -> None:
        healthy = any(v.healthy for v in self.server.router.verifiers)
        self._send_json(200 if healthy else 503, {"status": "ok" if healthy else "no healthy verifier"})

    def _models(self, model_id: str) -> None:
        name = self.server.router.model_name
        model = {"id": name, "object": "model", "created": self.server.started, "owned_by": "specserve"}
        if not model_id:
            self._send_json(200, {"object": "list", "data": [model]})
        elif model_id == name:
            self._send_json(200, model)
        else:
            raise ApiError(404, f"the model {model_id!r} does not exist; this server has {name!r}",
                           param="model", code="model_not_found")

    def _generate(self, chat: bool) -> None:
        router = self.server.router
        request = parse_request(self._read_json(), router, chat)
        token_bytes = router.tokenizer.token_bytes if request.params.logprobs is not None else None
        reply = Reply(chat, router.model_name, request.include_usage, token_bytes)
        handles: list[RequestHandle] = []
        try:
            for prompt, params in request.choices():  # one router request per choice
                handles.append(router.submit(prompt, params, mode=request.speculation, drafter=request.drafter))
            prompt_tokens = sum(len(h.prompt_token_ids) for h in handles[::request.n])  # each prompt once
            outputs = merged(handles)
            first = next(outputs)  # a failure before the first token still gets its own status code
            if request.stream:
                self._stream(reply.chunks(self._watch(chain([first], outputs)), len(handles), prompt_tokens))
            else:
                self._send_json(200, reply.whole(self._watch(chain([first], outputs)), len(handles), prompt_tokens))
        finally:
            for handle in handles:
                handle.cancel()  # a no-op once finished; frees the KV of a client that left

    # ---- the wire ---------------------------------------------------------------------------------

    def _read_json(self) -> object:
        length = self.headers.get("Content-Length", "0")
        if not length.isdigit():
            self.close_connection = True
            raise ApiError(400, f"Content-Length must be a number of bytes, got {length!r}")
        length = int(length)
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the body stays unread
            raise ApiError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes")
        try:
            return json.loads(self.rfile.read(length))
        except ValueError as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None

    def _send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, chunks: Iterator[dict]) -> None:
        """Server-sent events over chunked transfer encoding; a failure mid-stream becomes an error event."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for chunk in chunks:
                self._send_event(json.dumps(chunk))
        except ConnectionError:
            raise
        except Exception as exc:  # the status line is out: the error goes as an event, as OpenAI's does
            if not isinstance(exc, SpecserveError):
                log.exception("stream failed")
            self._send_event(json.dumps(ApiError.answering(exc).body()))
        self._send_event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")

    def _send_event(self, data: str) -> None:
        event = f"data: {data}\n\n".encode()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
        self.wfile.flush()

    def _watch(self, outputs: Iterable[tuple[int, RouterOutput]]) -> Iterator[tuple[int, RouterOutput]]:
        """`outputs`, raising ClientGone as soon as the client has closed its socket."""
        for output in outputs:
            if self._client_gone():
                raise ClientGone
            yield output

    def _client_gone(self) -> bool:
        """Readable with nothing to read: the peer closed (a pipelined next request reads as data)."""
        readable, _, _ = select.select([self.connection], [], [], 0)
        if not readable:
            return False
        try:
            return not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s " + format, self.address_string(), *args)
