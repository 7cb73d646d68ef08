"""The predict function's web page in headless Chromium, driven over the DevTools protocol.

Loads /, submits the pre-filled form with a real mouse click, checks the predicted class, the
probability bars and the model card, screenshots the page (the PNG must show a non-blank result
panel), checks that a hostile value sent from a field comes back as text, not markup, and that
the fields offer the model's categories ("other / unknown" added) and numeric ranges and work
with the keyboard only (Tab, End, type-ahead, Enter: real key events) to a result with bars and
factors.

Needs Debian's `chromium` (apt-get install chromium); the DevTools client is the small
standard-library websocket client below. Set PREDICT_SCREENSHOT_DIR to keep the screenshots.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from support.predict_support import (
    FunctionProcess,
    challenger_metadata,
    decision_document,
    write_local_model,
)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HOSTILE = '<img src=x onerror="window.__xss=1">'


class DevTools:
    """A minimal Chrome DevTools Protocol client over a standard-library websocket."""

    def __init__(self, ws_url: str, timeout: float = 30.0) -> None:
        parts = urlsplit(ws_url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        response = b""
        while b"\r\n\r\n" not in response:
            response += self.sock.recv(4096)
        if b" 101 " not in response.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"websocket upgrade refused: {response[:200]!r}")
        self.buffer = response.split(b"\r\n\r\n", 1)[1]
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def _recv_exact(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("DevTools closed the websocket")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def _recv_message(self) -> dict[str, Any]:
        payload = b""
        while True:
            first, second = self._recv_exact(2)
            length = second & 0x7F
            if length == 126:
                length = struct.unpack(">H", self._recv_exact(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self._recv_exact(8))[0]
            payload += self._recv_exact(length)  # server frames are not masked
            if first & 0x80:  # FIN
                return json.loads(payload)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        message = json.dumps({"id": self.next_id, "method": method, "params": params}).encode()
        mask = os.urandom(4)
        header = bytes([0x81])
        if len(message) < 126:
            header += bytes([0x80 | len(message)])
        elif len(message) < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack(">H", len(message))
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", len(message))
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(message))
        self.sock.sendall(header + mask + masked)
        while True:
            reply = self._recv_message()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def evaluate(self, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}")

    def click(self, selector: str) -> None:
        box = self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
            "e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect(); "
            "return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.call(
                "Input.dispatchMouseEvent",
                type=kind,
                x=box[0],
                y=box[1],
                button="left",
                clickCount=1,
            )

    def close(self) -> None:
        self.sock.close()


def press(browser: DevTools, key: str, code: int, text: str | None = None) -> None:
    """One key stroke as the keyboard gives it (keyDown with its text, or rawKeyDown)."""
    down: dict[str, Any] = {"type": "keyDown", "text": text} if text else {"type": "rawKeyDown"}
    for event in (down, {"type": "keyUp"}):
        browser.call(
            "Input.dispatchKeyEvent",
            key=key,
            code=key if len(key) > 1 else f"Key{key.upper()}",
            windowsVirtualKeyCode=code,
            **event,
        )


def decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit RGB/RGBA non-interlaced PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    height = channels = 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8 and colour in (2, 6)
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    rows: list[bytes] = []
    previous = bytearray(stride)
    for y in range(height):
        filter_type = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            upper_left = previous[i - channels] if i >= channels else 0
            if filter_type == 1:
                line[i] = (line[i] + left) & 0xFF
            elif filter_type == 2:
                line[i] = (line[i] + up) & 0xFF
            elif filter_type == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif filter_type == 4:
                p = left + up - upper_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - upper_left)
                pred = left if pa <= pb and pa <= pc else up if pb <= pc else upper_left
                line[i] = (line[i] + pred) & 0xFF
        rows.append(bytes(line))
        previous = line
    return width, height, rows


@pytest.fixture(scope="module")
def page_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    directory = tmp_path_factory.mktemp("browser-model")
    model_path, metadata_path = write_local_model(directory)
    # the gate's documents, read next to the metadata (a hostile reason must stay text)
    (directory / "challenger.json").write_text(json.dumps(challenger_metadata("2")))
    decision = dict(decision_document("kept"), reason="challenger worse: " + HOSTILE)
    (directory / "last-decision.json").write_text(json.dumps(decision))
    drift = {
        "drop_id": "0123456789abcdef",
        "status": "drifted",
        "message": "1 drifted (age) " + HOSTILE,
        "rows": 5000,
        "drifted": ["age"],
        "columns": {
            "age": {"psi": 0.8125, "status": "drifted", "unseen": {"rows": 0}},
            "race": {"psi": 0.03125, "status": "stable", "unseen": {"rows": 3}},
        },
    }
    (directory / "latest-drift.json").write_text(json.dumps(drift))
    process = FunctionProcess(
        {"MODEL_PATH": str(model_path), "MODEL_METADATA_PATH": str(metadata_path)}
    )
    try:
        process.wait_ready()
        deadline = time.monotonic() + 10  # the poll thread reads them right after the start
        while time.monotonic() < deadline:
            with urllib.request.urlopen(process.url + "/model-info", timeout=5) as reply:
                if json.loads(reply.read())["last_decision"] is not None:
                    break
            time.sleep(0.1)
        yield process.url
    finally:
        process.stop()


@pytest.fixture
def browser() -> Iterator[DevTools]:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium not found: apt-get install chromium")
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-"))
    process = subprocess.Popen(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            "--window-size=1280,1400",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    tools: DevTools | None = None
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as reply:
            targets = json.loads(reply.read())
        page = next(t for t in targets if t["type"] == "page")
        tools = DevTools(page["webSocketDebuggerUrl"])
        tools.call("Page.enable")
        tools.call("Runtime.enable")
        yield tools
    finally:
        if tools is not None:
            tools.close()
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)


def _open(browser: DevTools, url: str) -> None:
    browser.call("Page.navigate", url=url + "/")
    browser.wait_for(
        "document.readyState === 'complete' && "
        "document.getElementById('submit') && "
        "!document.getElementById('submit').disabled"
    )


def _screenshot(browser: DevTools, name: str) -> bytes:
    png = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
    keep = os.environ.get("PREDICT_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        (Path(keep) / name).write_bytes(png)
    return png


def test_form_predicts_and_shows_bars_and_model_card(page_server: str, browser: DevTools) -> None:
    _open(browser, page_server)
    groups = browser.evaluate("[...document.querySelectorAll('legend')].map(l => l.textContent)")
    assert groups == [
        "Demographics",
        "Admission",
        "Diagnoses",
        "Labs",
        "Medications",
        "Utilisation",
    ]
    assert browser.evaluate("document.getElementById('f-age').value") == "[70-80)"
    assert browser.evaluate("document.querySelectorAll('#groups :is(input, select)').length") == 47
    browser.click("#submit")
    browser.wait_for("!document.getElementById('result').hidden")
    expected = json.loads(
        urllib.request.urlopen(
            urllib.request.Request(
                page_server + "/predict",
                data=json.dumps({"features": browser.evaluate("readForm(modelInfo)")}).encode(),
                headers={"Content-Type": "application/json"},
            ),
            timeout=10,
        ).read()
    )
    assert (
        browser.evaluate("document.getElementById('result-class').textContent")
        == expected["readmission_prediction"]
    )
    bars = browser.evaluate(
        "[...document.querySelectorAll('#bars .bar')].map(b => [b.dataset.class, "
        "b.querySelector('.fill').getBoundingClientRect().width, "
        "b.querySelector('.track').getBoundingClientRect().width])"
    )
    assert [b[0] for b in bars] == ["<30", ">30", "NO"]
    for name, fill, track in bars:
        assert track > 50
        assert abs(fill / track - expected["probabilities"][name]) < 0.02
    # the explanation: the top factors of /predict?explain=true, in its order
    factors = browser.evaluate(
        "[...document.querySelectorAll('#result-factors li')].map(li => li.dataset.feature)"
    )
    explained = json.loads(
        urllib.request.urlopen(
            urllib.request.Request(
                page_server + "/predict?explain=true",
                data=json.dumps({"features": browser.evaluate("readForm(modelInfo)")}).encode(),
                headers={"Content-Type": "application/json"},
            ),
            timeout=10,
        ).read()
    )
    assert factors == [f["feature"] for f in explained["explanation"]["top_factors"]]
    # the model card
    card = browser.evaluate("document.getElementById('card-facts').textContent")
    assert "decision_tree" in card and "Version1" in card.replace(" ", "")
    assert browser.evaluate("document.querySelectorAll('#card-metrics tbody tr').length") >= 3
    quality = browser.evaluate("document.getElementById('card-quality').textContent")
    assert "Recall of <30" in quality and "0.1234 / 0.1302" in quality
    assert "0.2101 / 0.2111" in quality and "<30 0.0310" in quality
    flagged = browser.evaluate("document.getElementById('card-flagged').textContent")
    assert "race = Other: 600 rows, <30 recall 0.0100 (overall 0.1302)" in flagged
    selection = browser.evaluate("document.getElementById('card-selection').textContent")
    assert "Selected 00-decision_tree" in selection and "[-0.0042, +0.0031]" in selection
    browser.wait_for(
        "document.getElementById('learning-curve').complete && "
        "document.getElementById('learning-curve').naturalWidth === 48"
    )
    assert browser.evaluate("document.querySelectorAll('#curve-table tbody tr').length") == 2
    # the "Model" section: champion, challenger, last decision (its reason as text)
    assert "decision_tree" in browser.evaluate(
        "document.getElementById('gate-champion').textContent"
    )
    challenger = browser.evaluate("document.getElementById('gate-challenger').textContent")
    assert "logistic_regression" in challenger and "0.5712" in challenger
    assert browser.evaluate("document.getElementById('gate-verdict').textContent") == "kept"
    decision = browser.evaluate("document.getElementById('gate-decision').textContent")
    assert HOSTILE in decision and "-0.0038" in decision and "[-0.0090, +0.0010] (95 %)" in decision
    assert browser.evaluate("document.querySelectorAll('#model-gate img').length") == 0
    # the latest drop's drift report: its status, its columns by PSI, its message as text
    assert browser.evaluate("document.getElementById('drift-status').textContent") == "drifted"
    assert HOSTILE in browser.evaluate("document.getElementById('drift-facts').textContent")
    drift_rows = "[...document.querySelectorAll('#drift-columns tbody tr')].map(r => r.textContent)"
    assert browser.evaluate(drift_rows) == ["age0.8125drifted0", "race0.0313stable3"]
    # the screenshot: the result panel must be painted (many colours, not a blank box)
    browser.evaluate("window.scrollTo(0, 0)")  # the click scrolled to the button
    box = browser.evaluate(
        "(() => { const r = document.getElementById('result-panel')"
        ".getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; })()"
    )
    assert box[2] > 100 and box[3] > 80
    width, height, rows = decode_png(_screenshot(browser, "predict-page.png"))
    assert width >= 1000 and height >= 600
    colours = set()
    for y in range(int(box[1]), min(height, int(box[1] + box[3]))):
        row = rows[y]
        channels = len(row) // width
        for x in range(int(box[0]), min(width, int(box[0] + box[2])), 3):
            colours.add(row[x * channels : x * channels + 3])
    assert len(colours) > 20, "the result panel looks blank in the screenshot"


def test_hostile_value_is_shown_as_text(page_server: str, browser: DevTools) -> None:
    _open(browser, page_server)
    # race is a select: a tampered page (or an edited option) sends a value it does not list
    browser.evaluate(
        "(() => { const s = document.getElementById('f-race'); const o = "
        f"document.createElement('option'); o.value = o.textContent = {json.dumps(HOSTILE)}; "
        "s.append(o); s.value = o.value; })()"
    )
    assert browser.evaluate("document.getElementById('f-race').value") == HOSTILE
    browser.click("#submit")
    browser.wait_for("!document.getElementById('error').hidden")
    text = browser.evaluate("document.getElementById('error').textContent")
    assert HOSTILE in text and "Field: race" in text and "Caucasian" in text
    assert browser.evaluate("document.querySelectorAll('#error *').length") == 0
    assert browser.evaluate("document.querySelectorAll('img[src=\"x\"]').length") == 0
    time.sleep(0.3)
    assert browser.evaluate("typeof window.__xss") == "undefined"
    assert (
        browser.evaluate("document.getElementById('f-race').getAttribute('aria-invalid')") == "true"
    )
    _screenshot(browser, "predict-page-error.png")


def test_fields_offer_known_categories_and_ranges_and_work_by_keyboard(
    page_server: str, browser: DevTools
) -> None:
    _open(browser, page_server)
    info = json.loads(urllib.request.urlopen(page_server + "/model-info", timeout=10).read())
    categorical = [s for s in info["inputs"] if s["kind"] == "categorical"]
    numeric = [s for s in info["inputs"] if s["kind"] == "numeric"]
    assert categorical and numeric and all("categories" in s for s in categorical)
    assert all(isinstance(s.get("min"), float) and s["min"] <= s["max"] for s in numeric)
    shown = browser.evaluate(
        "Object.fromEntries([...document.querySelectorAll('#groups select')].map(s => "
        "[s.name, [...s.options].map(o => [o.value, o.textContent])]))"
    )
    assert set(shown) == {s["column"] for s in categorical}
    for spec in categorical:
        known = [c for c in spec["categories"] if c != "?"]
        assert shown[spec["column"]] == [[c, c] for c in known] + [["", "other / unknown"]]
    ranges = browser.evaluate(
        "Object.fromEntries([...document.querySelectorAll('#groups input[type=number]')]"
        ".map(i => [i.name, [Number(i.min), Number(i.max)]]))"
    )
    assert ranges == {s["column"]: [s["min"], s["max"]] for s in numeric}
    # keyboard only: Tab to race, End picks "other / unknown", Tab to gender, type-ahead "M",
    # Tab on to time_in_hospital, type a new value, Enter submits
    active = "document.activeElement.id"
    press(browser, "Tab", 9)
    assert browser.evaluate(active) == "f-race"
    press(browser, "End", 35)
    press(browser, "Tab", 9)
    assert browser.evaluate(active) == "f-gender"
    press(browser, "M", 77, "M")
    for _ in range(len(info["inputs"])):
        if browser.evaluate(active) == "f-time_in_hospital":
            break
        press(browser, "Tab", 9)
    assert browser.evaluate(active) == "f-time_in_hospital"
    for _ in range(4):
        press(browser, "Backspace", 8)
    press(browser, "5", 53, "5")
    press(browser, "Enter", 13, "\r")
    browser.wait_for("!document.getElementById('result').hidden")
    sent = browser.evaluate("readForm(modelInfo)")
    assert sent["race"] is None and sent["gender"] == "Male" and sent["time_in_hospital"] == 5
    explained = json.loads(
        urllib.request.urlopen(
            urllib.request.Request(
                page_server + "/predict?explain=true",
                data=json.dumps({"features": sent}).encode(),
                headers={"Content-Type": "application/json"},
            ),
            timeout=10,
        ).read()
    )
    bars = browser.evaluate(
        "[...document.querySelectorAll('#bars [role=listitem]')].map(b => b.textContent)"
    )
    assert bars == [
        f"{name}{explained['probabilities'][name] * 100:.1f} %" for name in info["classes"]
    ]
    factors = browser.evaluate(
        "[...document.querySelectorAll('#result-factors li')].map(li => li.dataset.feature)"
    )
    assert factors and factors == [f["feature"] for f in explained["explanation"]["top_factors"]]
    assert (
        browser.evaluate(
            "(() => { const t = document.getElementById("
            "document.getElementById('result-factors').getAttribute('aria-labelledby')); "
            "return !t.hidden && t.textContent; })()"
        )
        == "What moved this prediction"
    )
    # text that is not a number is refused in the page, naming the field
    assert browser.evaluate(active) == "f-time_in_hospital"
    press(browser, "Backspace", 8)
    press(browser, "e", 69, "e")
    press(browser, "Enter", 13, "\r")
    browser.wait_for("!document.getElementById('error').hidden")
    assert "time_in_hospital must be a number" in browser.evaluate(
        "document.getElementById('error').textContent"
    )
    assert (
        browser.evaluate(
            "document.getElementById('f-time_in_hospital').getAttribute('aria-invalid')"
        )
        == "true"
    )
