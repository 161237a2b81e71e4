"""``fastpix2pix serve``'s API against a real server on 127.0.0.1: translations equal ``predict``'s, bad
input gets its 4xx (never a 5xx), concurrent requests reach the model one at a time."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from serve_fixtures import NAME, SIZE, running_server, save_tiny_model, serve_options

from fastpix2pix.data import read_image, split_ab
from fastpix2pix.inference.run import predict
from fastpix2pix.runs.options import PredictOptions, build_parser
from fastpix2pix.serve.app import ServeApp, ServeOptions, choose_drawing_mode, inspect_image, label_schemes
from fastpix2pix.serve.http import ServeHTTPServer, exposure_warning, is_loopback, make_server

pytestmark = pytest.mark.usefixtures("one_thread")

Response = tuple[int, dict[str, str], bytes]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoints_dir, dataroot) of the tiny unet_128 run."""
    return save_tiny_model(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(model: tuple[Path, Path]) -> Iterator[tuple[ServeApp, ServeHTTPServer]]:
    """The paper protocol with the default limits."""
    with running_server(serve_options(model[0])) as running:
        yield running


@pytest.fixture(scope="module")
def strict(model: tuple[Path, Path]) -> Iterator[tuple[ServeApp, ServeHTTPServer]]:
    """Small limits: 50 kB bodies, 300x300 images, one request waiting at a time."""
    opt = serve_options(model[0], max_bytes=50_000, max_pixels=300 * 300, max_waiting=1)
    with running_server(opt) as running:
        yield running


def request(
    server: ServeHTTPServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    host, port = server.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def post(server: ServeHTTPServer, body: bytes) -> Response:
    return request(server, "POST", "/translate", body, {"Content-Type": "image/png"})


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    return buffer.getvalue()


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def inputs(dataroot: Path) -> dict[str, bytes]:
    """A label map from the test split (the canvas case), an odd-size RGB image (padding) and a 16-bit
    grayscale one (``predict`` keeps 16 bits)."""
    rng = np.random.default_rng(0)
    first = sorted((dataroot / "test").iterdir())[0]
    labels = split_ab(read_image(first), first)[1]
    gray16 = rng.integers(0, 65536, (30, 50), dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(gray16).save(buffer, "PNG")
    return {
        "labels.png": png_bytes(labels),
        "odd.png": png_bytes(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)),
        "gray16.png": buffer.getvalue(),
    }


def predicted(model: tuple[Path, Path], folder: Path, name: str, data: bytes, eval_mode: bool) -> np.ndarray:
    """What ``fastpix2pix predict`` writes for this input file."""
    path, out = folder / name, folder / f"out_{name}"
    path.write_bytes(data)
    opt = PredictOptions(
        input=str(path),
        output=str(out),
        name=NAME,
        checkpoints_dir=str(model[0]),
        device="cpu",
        eval=eval_mode,
    )
    predict(opt, say=lambda message: None)
    return read_image(out)


# --- translations -----------------------------------------------------------------------------------


def check_equals_predict(
    server: ServeHTTPServer, model: tuple[Path, Path], folder: Path, eval_mode: bool
) -> None:
    for name, data in inputs(model[1]).items():
        status, headers, body = post(server, data)
        assert status == 200 and headers["Content-Type"] == "image/png", body[:200]
        served = decode(body)
        expected = predicted(model, folder, name, data, eval_mode)
        height, width = Image.open(io.BytesIO(data)).size[::-1]
        assert served.shape[:2] == (height, width) and headers["X-Input-Size"] == f"{width}x{height}"
        assert headers["X-Padded-Size"] == f"{SIZE}x{SIZE}"
        # Bit-exact: the same decoding, padding, engine and seed; PNG is lossless both ways.
        np.testing.assert_array_equal(served, expected)
        assert post(server, data)[2] == body  # the same input gives the same output, every time


def test_translation_equals_predict_paper_protocol(
    server: tuple[ServeApp, ServeHTTPServer], model: tuple[Path, Path], tmp_path: Path
) -> None:
    check_equals_predict(server[1], model, tmp_path, eval_mode=False)


@pytest.mark.slow  # ~40 s on 2 busy cores: the eval engine is compiled twice (server and predict)
def test_translation_equals_predict_eval_protocol(model: tuple[Path, Path], tmp_path: Path) -> None:
    """--protocol eval is `predict --eval`, with the same (compiled, BatchNorm-folded) engine."""
    with running_server(serve_options(model[0], protocol="eval")) as (app, server):
        assert app.info["protocol"] == "eval"
        check_equals_predict(server, model, tmp_path, eval_mode=True)


def test_info_and_sample(server: tuple[ServeApp, ServeHTTPServer], model: tuple[Path, Path]) -> None:
    status, headers, body = request(server[1], "GET", "/info")
    info = json.loads(body)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert info["model"]["name"] == NAME and info["model"]["netG"] == "unet_128"
    assert info["model"]["direction"] == "BtoA" and info["device"] == "cpu" and info["protocol"] == "paper"
    assert info["canvas"] == {"width": SIZE, "height": SIZE} and info["size_multiple"] == SIZE
    # The synthetic dataset's inputs are label maps in its own palette, not the facades one.
    assert info["mode"] == "labels" and info["palette"] == "synthetic", info["mode_reason"]
    palettes = {p["name"]: p["classes"] for p in info["palettes"]}
    assert palettes["synthetic"][0] == {"name": "background", "color": "#000080"}
    assert len(palettes["facades"]) == 12 and palettes["facades"][2]["name"] == "window"
    status, headers, sample = request(server[1], "GET", info["sample"])
    first = sorted((model[1] / "test").iterdir())[0]
    assert status == 200 and np.array_equal(decode(sample), split_ab(read_image(first), first)[1])


def test_page_and_assets_are_local(server: tuple[ServeApp, ServeHTTPServer]) -> None:
    status, headers, page = request(server[1], "GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    for asset, kind in (("/app.js", "text/javascript"), ("/style.css", "text/css")):
        status, headers, body = request(server[1], "GET", asset)
        assert status == 200 and headers["Content-Type"] == kind and body
    everything = page + request(server[1], "GET", "/app.js")[2] + request(server[1], "GET", "/style.css")[2]
    assert not re.search(rb"https?://", everything), "the page must not reference another host"


# --- bad input: 4xx with a message, never 5xx ----------------------------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG file whose header declares a ``width x height`` RGB image (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )


def gif_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "GIF")
    return buffer.getvalue()


BAD_BODIES = {
    "not an image": (b"hello, this is text", 400, "not an image"),
    "empty body": (b"", 400, "empty body"),
    "bomb header above Pillow's limit": (png_claiming(100_000, 100_000), 413, "too large"),
    "header above --max_pixels": (png_claiming(1000, 1000), 413, "1000x1000 = 1000000 pixels"),
    "thin, but padded above --max_pixels": (png_claiming(50_000, 1), 413, "padded to 50048x128"),
    "truncated pixel data": (png_bytes(np.full((64, 64, 3), 7, np.uint8))[:-40], 400, "the image"),
    "a format not accepted (GIF)": (gif_bytes(), 400, "not an image"),
    "zero-size TIFF header": (b"II*\x00" + b"\x00" * 12, 400, "not an image"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_bodies_get_their_4xx(strict: tuple[ServeApp, ServeHTTPServer], case: str) -> None:
    body, expected, message = BAD_BODIES[case]
    status, headers, answer = post(strict[1], body)
    error = json.loads(answer)
    assert (status, error["status"]) == (expected, expected) and message in error["error"], error
    assert headers["Content-Type"] == "application/json"


def test_oversize_body_is_refused_before_it_is_read(strict: tuple[ServeApp, ServeHTTPServer]) -> None:
    host, port = strict[1].server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=10)
    connection.putrequest("POST", "/translate")
    connection.putheader("Content-Length", str(10**9))  # a gigabyte announced, never sent
    connection.endheaders()
    response = connection.getresponse()
    error = json.loads(response.read())
    assert response.status == 413 and "body too large: 1000000000 bytes, the limit is 50000" in error["error"]
    assert response.getheader("Connection") == "close"
    connection.close()
    big = png_bytes(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8))
    assert len(big) > 50_000 and post(strict[1], big)[0] == 413  # a real body over the limit


@pytest.mark.parametrize(
    ("method", "path", "headers", "expected"),
    [
        ("GET", "/nothing", {}, 404),
        ("GET", "/translate", {}, 405),
        ("POST", "/info", {"Content-Length": "0"}, 405),
        ("PUT", "/translate", {"Content-Length": "0"}, 405),
        ("POST", "/translate", {"Host": "attacker.example"}, 403),  # DNS rebinding
        ("POST", "/translate", {"Content-Length": "ten"}, 400),
        ("POST", "/translate", {"Transfer-Encoding": "chunked"}, 411),
    ],
)
def test_bad_requests_get_their_4xx(
    strict: tuple[ServeApp, ServeHTTPServer], method: str, path: str, headers: dict[str, str], expected: int
) -> None:
    host, port = strict[1].server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=10)
    connection.putrequest(method, path, skip_host="Host" in headers)
    for key, value in headers.items():
        connection.putheader(key, value)
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == expected and json.loads(response.read())["error"]
    connection.close()


def test_options_have_help_and_a_busy_port_is_a_clear_error(server: tuple[ServeApp, ServeHTTPServer]) -> None:
    for action in build_parser(ServeOptions)._actions:
        assert action.dest == "help" or (action.help and len(action.help) > 10), action.dest
    with pytest.raises(ValueError, match=r"cannot listen on 127\.0\.0\.1:\d+: .*--port 0 picks a free port"):
        make_server(server[0], "127.0.0.1", server[1].server_address[1])
    with pytest.raises(ValueError, match="--max_pixels must be at least 1"):
        ServeOptions(max_pixels=0)


def test_limits_and_host_checks_in_isolation() -> None:
    assert inspect_image(png_claiming(300, 300), 300 * 300) == ("PNG", 300, 300)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.org")
    assert exposure_warning("127.0.0.1", "cpu") is None and exposure_warning("localhost", "cpu") is None
    assert "anyone who can reach this address" in str(exposure_warning("0.0.0.0", "cuda"))


def test_drawing_mode_from_the_inputs() -> None:
    schemes, _ = label_schemes(None)
    paper = np.full((64, 64, 3), 255, np.uint8)
    paper[20:22, 5:60] = 0
    assert choose_drawing_mode("auto", None, schemes, [paper], "x").mode == "outline"
    facades = np.asarray(schemes["facades"].palette)[np.repeat(np.arange(12), 8 * 96).reshape(96, 96)]
    assert choose_drawing_mode("auto", None, schemes, [facades], "x").palette == "facades"
    photo = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert "neither" in choose_drawing_mode("auto", None, schemes, [photo], "x").reason
    assert choose_drawing_mode("auto", None, schemes, [], "edges2shoes").mode == "outline"
    assert choose_drawing_mode("outline", None, schemes, [facades], "x").mode == "outline"


# --- one model call at a time -------------------------------------------------------------------------


class CountingEngine:
    """Wraps the engine: counts calls and the most that ran at once; each call takes ``delay`` longer."""

    def __init__(self, engine: Any, delay: float) -> None:
        self.engine, self.delay = engine, delay
        self.active = self.peak = self.calls = 0
        self.guard = threading.Lock()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with self.guard:
            self.active += 1
            self.peak, self.calls = max(self.peak, self.active), self.calls + 1
        try:
            time.sleep(self.delay)
            return self.engine(x)
        finally:
            with self.guard:
                self.active -= 1


def concurrently(server: ServeHTTPServer, bodies: list[bytes]) -> list[Response]:
    start = threading.Barrier(len(bodies))
    results: list[Response | None] = [None] * len(bodies)

    def run(i: int) -> None:
        start.wait()
        results[i] = post(server, bodies[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return [r for r in results if r is not None]


def test_two_concurrent_requests_both_succeed_one_model_call_at_a_time(
    server: tuple[ServeApp, ServeHTTPServer], model: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    app, http_server = server
    counting = CountingEngine(app.translator.engine, delay=0.3)
    monkeypatch.setattr(app.translator, "engine", counting)
    data = inputs(model[1])["labels.png"]
    alone = post(http_server, data)[2]
    results = concurrently(http_server, [data, data])
    assert [status for status, _, _ in results] == [200, 200]
    assert all(body == alone for _, _, body in results)  # each request reseeds: no cross-talk
    assert counting.calls == 3 and counting.peak == 1


def test_requests_beyond_the_waiting_limit_are_told_to_retry(
    strict: tuple[ServeApp, ServeHTTPServer], model: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    app, http_server = strict
    monkeypatch.setattr(app.translator, "engine", CountingEngine(app.translator.engine, delay=1.0))
    data = inputs(model[1])["labels.png"]
    statuses = sorted(status for status, _, _ in concurrently(http_server, [data, data]))
    assert statuses == [200, 503]  # --max_waiting 1: the second is refused at once, not queued


@pytest.mark.parametrize("netG", ["unet_128", "resnet_6blocks"])
def test_a_tiny_input_gets_the_same_answer_from_serve_and_predict(netG: str, tmp_path: Path) -> None:
    """A 3x3 image is padded to the generator's smallest size by both: a ResNet needs two multiples (its
    bottleneck's reflection pads need 2x2), a U-Net one. Serve once padded to one multiple only, and a
    ResNet answered 500."""
    checkpoints, _ = save_tiny_model(tmp_path / "model", netG=netG)
    data = png_bytes(np.random.default_rng(3).integers(0, 256, (3, 3, 3), dtype=np.uint8))
    expected = predicted((checkpoints, tmp_path), tmp_path, "tiny.png", data, eval_mode=False)
    with running_server(serve_options(checkpoints)) as (_, server):
        status, headers, body = post(server, data)
    assert status == 200, body[:300]
    assert decode(body).shape[:2] == (3, 3)
    smallest = {"unet_128": 128, "resnet_6blocks": 2 * 4}[netG]  # multiples of 2**7 and 2**2
    assert headers["X-Padded-Size"] == f"{smallest}x{smallest}"
    np.testing.assert_array_equal(decode(body), expected)


def test_a_burst_of_clients_all_get_an_answer(
    strict: tuple[ServeApp, ServeHTTPServer], model: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """96 requests from 32 threads at once: each gets 200 or 503 (--max_waiting 1), none a reset or a
    timeout. The listening socket's backlog must hold the burst (the standard library's default is 5)."""
    app, http_server = strict
    monkeypatch.setattr(app.translator, "engine", CountingEngine(app.translator.engine, delay=0.05))
    data = inputs(model[1])["labels.png"]
    host, port = http_server.server_address[:2]
    threads, per_thread = 32, 3
    start = threading.Barrier(threads)
    outcomes: list[str] = []
    guard = threading.Lock()

    def client() -> None:
        start.wait(timeout=30)
        for _ in range(per_thread):
            connection = http.client.HTTPConnection(host, port, timeout=30)
            try:
                connection.request("POST", "/translate", body=data, headers={"Content-Type": "image/png"})
                response = connection.getresponse()
                response.read()
                outcome = str(response.status)
            except OSError as error:  # reset, refused, timed out
                outcome = type(error).__name__
            finally:
                connection.close()
            with guard:
                outcomes.append(outcome)

    workers = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert not any(worker.is_alive() for worker in workers), "clients still waiting after 120 s"
    assert len(outcomes) == threads * per_thread
    assert set(outcomes) <= {"200", "503"}, sorted(set(outcomes))
    assert "200" in outcomes


# --- the command --------------------------------------------------------------------------------------


def test_command_prints_the_url_and_serves(model: tuple[Path, Path]) -> None:
    command = [
        sys.executable, "-m", "fastpix2pix", "serve", "--name", NAME, "--checkpoints_dir", str(model[0]),
        "--port", "0", "--device", "cpu",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        assert process.stdout is not None
        for line in process.stdout:  # until the URL (the server is listening by then)
            lines.append(line)
            if line.startswith("open http://"):
                break
        url = re.search(r"http://127\.0\.0\.1:(\d+)/", lines[-1])
        assert url, "".join(lines)
        connection = http.client.HTTPConnection("127.0.0.1", int(url.group(1)), timeout=30)
        connection.request("GET", "/info")
        assert json.loads(connection.getresponse().read())["model"]["name"] == NAME
        connection.close()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_closing_the_server_ends_its_connections(model: tuple[Path, Path]) -> None:
    """server_close ends an idle keep-alive connection and waits for its thread. Before, the thread sat in
    its read for up to 60 s and, a daemon, could hold the last reference to the model when the process
    exited after Ctrl+C: freeing the model's tensors during interpreter shutdown aborted the process (exit
    -6, "terminate called without an active exception"; 3 of 27 runs of the test above on a loaded CPU)."""
    with running_server(serve_options(model[0])) as (_, server):
        before = set(threading.enumerate())
        connection = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
        connection.request("GET", "/info")
        assert connection.getresponse().read()  # answered; the connection stays open (HTTP/1.1 keep-alive)
        threads = [thread for thread in threading.enumerate() if thread not in before]
        assert len(threads) == 1 and threads[0].is_alive()  # the connection's thread, waiting for a request
        started = time.monotonic()
    assert time.monotonic() - started < 10
    assert not threads[0].is_alive()
    assert connection.sock is not None and connection.sock.recv(1) == b""  # the server closed it
    connection.close()


def test_precision_bf16_answers_as_predict_bf16_does(model: tuple[Path, Path], tmp_path: Path) -> None:
    """--precision bf16 (pinned: auto would depend on the CPU) serves what `predict --precision bf16`
    writes, bit for bit, and says so in /info; both stay within bf16 rounding of float32."""
    data = inputs(model[1])["labels.png"]
    path = tmp_path / "labels.png"
    path.write_bytes(data)
    written = {}
    for precision in ("bf16", "fp32"):
        opt = PredictOptions(
            input=str(path), output=str(tmp_path / f"{precision}.png"), name=NAME,
            checkpoints_dir=str(model[0]), device="cpu", precision=precision,
        )  # fmt: skip
        written[precision] = read_image(predict(opt, say=lambda message: None)[0])
    lines: list[str] = []
    app = ServeApp(serve_options(model[0], precision="bf16"), say=lines.append)
    assert lines[0].startswith("fastpix2pix serve: engine torch, precision bf16 (--precision bf16;")
    assert app.info["model"]["precision"] == "bf16"
    with running_server(serve_options(model[0], precision="bf16")) as (_, server):
        status, _, body = post(server, data)
    assert status == 200
    np.testing.assert_array_equal(decode(body), written["bf16"])
    assert np.abs(written["bf16"].astype(int) - written["fp32"]).max() <= 3  # uint8 levels
