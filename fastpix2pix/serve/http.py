"""The HTTP side of ``fastpix2pix serve``: routes, the threaded server, the loopback rule."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from PIL import Image

from fastpix2pix.serve.app import WEB_ASSETS, RequestError, ServeApp, ServeOptions

__all__ = ["ServeHTTPServer", "exposure_warning", "is_loopback", "make_server", "run_in_thread", "serve"]

CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css"}
# The page may load only from this server: no CDN, font or analytics request can leave the machine.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; connect-src 'self'; object-src 'none'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """``Host`` header -> the name without port (``[::1]:8000`` -> ``::1``)."""
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class _Handler(BaseHTTPRequestHandler):
    server: ServeHTTPServer
    protocol_version = "HTTP/1.1"  # keep-alive: the page posts after every stroke
    server_version = "fastpix2pix"
    timeout = 60  # seconds a client may stall while sending: a stalled upload frees its thread

    # -- routing --
    def do_GET(self) -> None:
        if not self._host_allowed():
            return
        app, path = self.server.app, urlsplit(self.path).path
        if path in WEB_ASSETS:
            content_type = CONTENT_TYPES[Path(WEB_ASSETS[path]).suffix]
            self._send(
                200, app.assets[path], content_type, {"Content-Security-Policy": CONTENT_SECURITY_POLICY}
            )
        elif path == "/info":
            self._send_json(200, app.info)
        elif path == "/sample.png" and app.sample_png is not None:
            self._send(200, app.sample_png, "image/png")
        elif path == "/translate":
            self._send_error(405, "POST the image to /translate", {"Allow": "POST"})
        else:
            self._send_error(404, f"no such page: {path}")

    def do_POST(self) -> None:
        if not self._host_allowed():
            return
        path = urlsplit(self.path).path
        if path != "/translate":
            known = path in WEB_ASSETS or path in ("/info", "/sample.png")
            self._send_error(405 if known else 404, f"POST goes to /translate, not {path}")
            self.close_connection = True  # the body was not read
            return
        started = time.perf_counter()
        try:
            png, headers = self.server.app.translate_png(self._read_body())
        except RequestError as error:
            self._send_error(error.status, error.message)
            return
        except Exception:  # a fault of the server, not of the input: logged with its traceback
            self.server.app.say(f"error in POST /translate:\n{traceback.format_exc()}")
            self._send_error(500, "internal error while translating (see the server's log)")
            return
        headers["X-Total-Ms"] = f"{(time.perf_counter() - started) * 1000:.1f}"
        self._send(200, png, "image/png", headers)

    def _method_not_allowed(self) -> None:
        self._send_error(405, f"{self.command} is not used here: GET the page, POST to /translate")
        self.close_connection = True

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _method_not_allowed

    # -- request parts --
    def _host_allowed(self) -> bool:
        """On loopback, only loopback Host names: a page elsewhere whose name an attacker re-points to
        127.0.0.1 (DNS rebinding) is refused."""
        if not is_loopback(self.server.app.opt.host):
            return True
        name = _host_name(self.headers.get("Host", ""))
        if name in LOOPBACK_NAMES or is_loopback(name):
            return True
        self._send_error(403, f"Host {name!r} refused: this server answers to localhost / 127.0.0.1 only")
        self.close_connection = True
        return False

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise RequestError(411, "chunked uploads are not accepted: send a Content-Length")
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            self.close_connection = True
            raise RequestError(411, "Content-Length required")
        try:
            length = int(length_text)
        except ValueError:
            self.close_connection = True
            raise RequestError(400, f"bad Content-Length {length_text!r}") from None
        limit = self.server.app.opt.max_bytes
        if length < 0 or length > limit:
            self.close_connection = True  # the body is left unread: this connection cannot be reused
            raise RequestError(413, f"body too large: {length} bytes, the limit is {limit} (--max_bytes)")
        body = self.rfile.read(length)
        if len(body) != length:
            self.close_connection = True
            raise RequestError(400, f"incomplete body: {len(body)} of {length} bytes arrived")
        return body

    # -- responses --
    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", headers)

    def _send_error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        extra = dict(headers or {})
        if status == 503:
            extra["Retry-After"] = "1"
        self._send_json(status, {"error": message, "status": status}, extra)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        self.server.app.say(f"{self.command} {self.path} {code}")

    def log_message(self, format: str, *args: Any) -> None:  # http.server's own notes (bad requests)
        self.server.app.say(format % args)


class ServeHTTPServer(ThreadingHTTPServer):
    """A thread per connection; the model behind :class:`Translator`'s lock.

    :meth:`server_close` ends the connections too: it closes their read side (an idle keep-alive
    connection ends at once, a request being answered still gets its answer) and waits for their threads.
    Why: a connection thread can hold the last reference to the app, and with it the model. A daemon thread
    still freeing the model's tensors when the interpreter shuts down is stopped by a forced unwind through
    PyTorch's C++ frames, which aborts the process ("terminate called without an active exception", exit
    status -6, seen after Ctrl+C on a loaded machine).
    """

    daemon_threads = True  # a connection that outlives close_timeout_s does not block the exit
    # The listen backlog: connections the kernel holds until the server accepts them. The standard
    # library's 5 resets clients of a burst (2 of 96 requests from 32 threads on loopback); every client
    # must get an answer, a 503 when --max_waiting requests already wait for the model.
    request_queue_size = 1024
    close_timeout_s = 30.0  # what server_close waits for the requests being answered

    def __init__(self, address: tuple[str, int], app: ServeApp) -> None:
        self.app = app
        self._connections: dict[threading.Thread, socket.socket] = {}
        self._connections_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """A daemon thread per connection, known to :meth:`server_close` before it starts."""
        thread = threading.Thread(
            target=self.process_request_thread, args=(request, client_address), daemon=True
        )
        with self._connections_lock:
            self._connections[thread] = request
        try:
            thread.start()
        except BaseException:  # no thread to wait for (the server's error handling closes the request)
            with self._connections_lock:
                self._connections.pop(thread, None)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections.pop(threading.current_thread(), None)

    def server_close(self) -> None:
        """Stop listening, end the open connections and wait (up to ``close_timeout_s``) for their threads."""
        super().server_close()
        with self._connections_lock:
            connections = list(self._connections.items())
        for _, connection in connections:
            # Wakes a thread waiting for the next request on this connection: it reads end-of-file. OSError:
            # the connection is closed already.
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RD)
        deadline = time.monotonic() + self.close_timeout_s
        for thread, _ in connections:
            thread.join(max(0.0, deadline - time.monotonic()))

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1" if host == "0.0.0.0" else "::1"
        return f"http://[{host}]:{port}/" if ":" in str(host) else f"http://{host}:{port}/"


def exposure_warning(host: str, device: str) -> str | None:
    """What to tell the user when the server can be reached from other machines (None on loopback)."""
    if is_loopback(host):
        return None
    return (
        f"warning: listening on {host}: anyone who can reach this address can use the model (and this "
        f"machine's {device}); there is no authentication. --host 127.0.0.1 keeps it on this machine"
    )


def make_server(app: ServeApp, host: str, port: int) -> ServeHTTPServer:
    """The listening server (not yet serving); a port in use is a clear error, not a traceback."""
    try:
        return ServeHTTPServer((host, port), app)
    except OSError as error:
        hint = "; --port 0 picks a free port" if error.errno == errno.EADDRINUSE else ""
        raise ValueError(f"cannot listen on {host}:{port}: {error.strerror or error}{hint}") from None


def serve(opt: ServeOptions, *, say: Callable[[str], None] = print) -> None:
    """Load the model, listen, print the URL, and serve until interrupted."""
    # Pillow's own limit, lowered to ours: whatever decodes an image in this process refuses a bomb
    # even where the header check would not run (twice the limit raises, as Pillow does by default).
    Image.MAX_IMAGE_PIXELS = opt.max_pixels
    app = ServeApp(opt, say=say)
    server = make_server(app, opt.host, opt.port)
    info = app.info
    say(
        f"fastpix2pix serve: {info['model']['weights']} on {info['device']} ({opt.protocol} protocol), "
        f"warmed up in {info['warm_up_ms']:.0f} ms; drawing mode {info['mode']} ({info['mode_reason']})"
    )
    warning = exposure_warning(opt.host, info["device"])
    if warning:
        print(warning, file=sys.stderr, flush=True)
    say(f"open {server.url} (Ctrl+C stops)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def run_in_thread(server: ServeHTTPServer) -> threading.Thread:
    """Serve in a background thread (tests, notebooks); stop with ``server.shutdown()``."""
    thread = threading.Thread(target=server.serve_forever, name="fastpix2pix-serve", daemon=True)
    thread.start()
    return thread
