"""Security properties of the project and of the REAL local stack (tests/support/stack.py).

* the object store refuses anonymous and wrong-key requests (raw HTTP and boto3), its filer
  and volume HTTP APIs unsigned ones, and its gRPC ports clients without the stack's
  certificate (`weed shell`);
* every listening TCP socket of the stack's processes is bound to the loopback address;
* no secret in the files git would commit, none in the stack's log files;
* the serving path loads ONNX only: no unpickling module imported by the predict code, and the
  running predict process has no scikit-learn, pandas, pyarrow or mlflow loaded;
* every HTTP entry point refuses a body over its limit with 413 or 400 (no 5xx, no hang);
* the predict page writes data with textContent, never as HTML.
"""

from __future__ import annotations

import ast
import json
import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError
from support.imports import imported_modules

from readmission.localstack import processes

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK_V4 = "0100007F"  # 127.0.0.1 as /proc/net/tcp writes it
LOOPBACK_V6 = {"00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}
OVER_LIMIT = 8 * 1024 * 1024  # every entry point's limit is 1 MiB or less for events
UNPICKLERS = {
    "pickle",
    "cPickle",
    "_pickle",
    "joblib",
    "skops",
    "mlflow",
    "dill",
    "cloudpickle",
    "shelve",
}
FORBIDDEN_IN_SERVING = {
    "pickle",
    "cPickle",
    "_pickle",
    "joblib",
    "skops",
    "mlflow",
    "dill",
    "cloudpickle",
    "sklearn",
    "pandas",
    "pyarrow",
    "shelve",
    "marshal",
}


def _credentials(stack: Any) -> tuple[str, str]:
    info = json.loads((stack.state_dir / "credentials.json").read_text())
    return info["access_key"], info["secret_key"]


def _secrets(stack: Any) -> list[str]:
    """Every generated secret of the running stack (S3 secret key, webhook token, JWT keys)."""
    info = json.loads((stack.state_dir / "credentials.json").read_text())
    values = [value for name, value in info.items() if name != "access_key" and value]
    security = stack.state_dir / "seaweedfs" / "security.toml"
    if security.exists():
        keys = re.findall(r'(?m)^key\s*=\s*"([^"]+)"', security.read_text())
        values += [key for key in keys if not key.startswith("/")]  # not the gRPC key's path
    grpc_key = stack.state_dir / "seaweedfs" / "tls" / "grpc.key"
    if grpc_key.exists():  # the base64 lines of the gRPC private key
        lines = grpc_key.read_text().splitlines()
        values += [line for line in lines if "-----" not in line and len(line) >= 16]
    return values


def _s3(stack: Any, **keys: Any) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=stack.s3_url,
        region_name="us-east-1",
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1},
            **({"signature_version": UNSIGNED} if not keys else {}),
        ),
        **keys,
    )


def _http(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> int:
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


# --------------------------------------------------------------------------- object store


@pytest.mark.stack
def test_s3_refuses_anonymous_http(stack: Any) -> None:
    raw = stack.settings.buckets.raw
    assert _http("GET", f"{stack.s3_url}/") == 403
    assert _http("GET", f"{stack.s3_url}/{raw}/") == 403
    assert _http("PUT", f"{stack.s3_url}/{raw}/anonymous.csv", b"a,b\n1,2\n") == 403
    assert _http("DELETE", f"{stack.s3_url}/{stack.settings.buckets.models}/x") == 403
    assert not stack.store.exists(raw, "anonymous.csv")


@pytest.mark.stack
@pytest.mark.parametrize("which", ["unsigned", "wrong secret", "unknown access key"])
def test_s3_refuses_boto3_without_the_right_keys(stack: Any, which: str) -> None:
    access, secret = _credentials(stack)
    keys = {
        "unsigned": {},
        "wrong secret": {"aws_access_key_id": access, "aws_secret_access_key": secret + "x"},
        "unknown access key": {
            "aws_access_key_id": "RAWRONGWRONGWRONG001",
            "aws_secret_access_key": secret,
        },
    }[which]
    client = _s3(stack, **keys)
    key = f"wrong-key-{which.replace(' ', '-')}.csv"
    for call in (
        lambda: client.list_buckets(),
        lambda: client.list_objects_v2(Bucket=stack.settings.buckets.raw),
        lambda: client.put_object(Bucket=stack.settings.buckets.raw, Key=key, Body=b"x"),
        lambda: client.get_object(Bucket=stack.settings.buckets.datasets, Key="any"),
    ):
        with pytest.raises(ClientError) as refused:
            call()
        code = refused.value.response["Error"]["Code"]
        assert code in {"AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId"}, code
    assert not stack.store.exists(stack.settings.buckets.raw, key)
    # the right keys work (so the refusals above are about the keys)
    assert _s3(stack, aws_access_key_id=access, aws_secret_access_key=secret).list_buckets()


@pytest.mark.stack
def test_the_filer_and_volume_http_apis_refuse_anonymous_access(stack: Any) -> None:
    """Around the S3 keys: SeaweedFS's own HTTP APIs (JWT-signed, localstack/seaweed.py)."""
    raw = stack.settings.buckets.raw
    stack.store.put_bytes(raw, "filer-probe.csv", b"a,b\n1,2\n")
    json_accept = {"Accept": "application/json"}
    assert _http("GET", f"{stack.filer_url}/buckets/", headers=json_accept) in {401, 403}
    assert _http("GET", f"{stack.filer_url}/buckets/{raw}/filer-probe.csv") in {401, 403}
    put = _http("PUT", f"{stack.filer_url}/buckets/{raw}/filer-anon.csv", b"x,y\n")
    assert put in {401, 403}
    assert not stack.store.exists(raw, "filer-anon.csv")
    volume = f"http://127.0.0.1:{stack.ports['volume']}"
    assert _http("POST", f"{volume}/1,01637037d6", b"x") in {401, 403}


def _weed_shell(stack: Any, commands: str, cwd: Path, timeout: float = 60) -> str:
    """`weed shell` against the stack's master and filer (gRPC), run in `cwd` with HOME=cwd
    (where it looks for security.toml); its output, or how it timed out."""
    ports = stack.ports
    master = f"127.0.0.1:{ports['master']}.{ports['master.grpc']}"
    filer = f"127.0.0.1:{ports['filer']}.{ports['filer.grpc']}"
    weed = Path(sys.executable).with_name("weed")
    try:
        done = subprocess.run(
            [str(weed), "shell", f"-master={master}", f"-filer={filer}"],
            input=commands,
            cwd=cwd,
            env={**os.environ, "HOME": str(cwd)},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as error:
        return f"timed out after {timeout}s: {error.stdout!r} {error.stderr!r}"
    return done.stdout + done.stderr


@pytest.mark.stack
def test_seaweedfs_grpc_refuses_a_client_without_the_stacks_certificate(
    stack: Any, tmp_path: Path
) -> None:
    """Around the S3 keys: `weed shell` renames and deletes through the filer's gRPC port.
    Without the stack's client certificate (mutual TLS, localstack/seaweed_tls.py) it cannot
    connect: the object stays where it is. With it (the stack's own security.toml) the same
    shell lists the bucket, so the refusal is the certificate's doing."""
    raw = stack.settings.buckets.raw
    stack.store.put_bytes(raw, "grpc-probe.txt", b"probe")  # not .csv: fires no event
    output = _weed_shell(
        stack,
        f"fs.mv /buckets/{raw}/grpc-probe.txt /buckets/{raw}/grpc-moved.txt\n"
        f"fs.rm /buckets/{raw}/grpc-probe.txt\nexit\n",
        tmp_path,
        timeout=15,  # it retries the refused handshake until killed; the control below takes ~1 s
    )
    assert stack.store.exists(raw, "grpc-probe.txt"), output
    assert not stack.store.exists(raw, "grpc-moved.txt"), output
    listed = _weed_shell(stack, f"fs.ls /buckets/{raw}\nexit\n", stack.state_dir / "seaweedfs")
    assert "grpc-probe.txt" in listed, listed


# --------------------------------------------------------------------------- sockets


def _stack_pids(stack: Any) -> dict[int, str]:
    """Every process of the stack: the recorded leaders and all processes in their sessions."""
    leaders = {
        p.pid: p.name
        for p in processes.recorded(stack.state_dir / "run")
        if processes.is_running(p)
    }
    found = dict(leaders)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        session, group = int(fields[3]), int(fields[2])
        for leader in (session, group):
            if leader in leaders:
                found[int(entry.name)] = leaders[leader]
    return found


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    except OSError:
        pass
    return inodes


def _listening() -> Iterator[tuple[str, str, int, str]]:
    """(family, hex address, port, inode) of every listening TCP socket of this machine."""
    for family in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{family}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            address, port = fields[1].split(":")
            yield family, address, int(port, 16), fields[9]


@pytest.mark.stack
def test_every_listening_socket_of_the_stack_is_loopback(stack: Any) -> None:
    pids = _stack_pids(stack)
    owned = {inode: pids[pid] for pid in pids for inode in _socket_inodes(pid)}
    listening = [(f, a, p, owned[i]) for f, a, p, i in _listening() if i in owned]
    names = {name for *_, name in listening}
    # every recorded process listens somewhere (else this test would look at nothing)
    assert {"seaweedfs", "mlflow", "broker", "events-adapter"} <= names, names
    exposed = [
        (name, port, address)
        for family, address, port, name in listening
        if not (address == LOOPBACK_V4 if family == "tcp" else address in LOOPBACK_V6)
    ]
    assert exposed == [], f"bound beyond loopback: {exposed}"
    assert {port for *_, port, _ in listening} >= set(stack.ports.values())


# --------------------------------------------------------------------------- secrets

SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----"),
    "AWS secret assignment": re.compile(
        r"(?i)aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+]{40}\b"
    ),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36}\b"),
    "Slack token": re.compile(r"\bxox[baprs]-[A-Za-z0-9-]{10,}"),
}


def _committable_files() -> list[Path]:
    """Tracked files plus those `git add -A` would add (untracked, not ignored)."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    files = [ROOT / name for name in listed if name]
    return [path for path in files if path.is_file() and "node_modules" not in path.parts]


def _text(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    return data.decode(errors="replace")


def test_the_scanner_finds_what_it_looks_for() -> None:
    samples = [
        "AKIA" + "Z" * 16,
        "-----BEGIN RSA " + "PRIVATE KEY-----",
        "aws_secret_access_key = " + "a" * 40,
    ]
    for sample in samples:
        assert any(p.search(sample) for p in SECRET_PATTERNS.values()), sample


@pytest.mark.stack
def test_no_secret_in_the_files_git_would_commit(stack: Any) -> None:
    access, _ = _credentials(stack)
    findings = []
    files = _committable_files()
    assert any(path.name == "design.md" for path in files)
    for path in files:
        text = _text(path)
        if text is None:
            continue
        for name, pattern in SECRET_PATTERNS.items():
            for match in pattern.finditer(text):
                findings.append(f"{path.relative_to(ROOT)}: {name}: {match.group(0)[:12]}…")
        if access in text or any(value in text for value in _secrets(stack)):
            findings.append(f"{path.relative_to(ROOT)}: the running stack's credentials")
    assert findings == []
    assert (
        subprocess.run(
            ["git", "check-ignore", "-q", ".state/credentials.json"], cwd=ROOT
        ).returncode
        == 0
    )


@pytest.mark.stack
def test_no_secret_in_the_stack_logs_and_state_files_are_private(stack: Any) -> None:
    _, secret = _credentials(stack)
    # some traffic first: a wrong-key request and a few pipeline-side requests
    with pytest.raises(ClientError):
        _s3(
            stack, aws_access_key_id=_credentials(stack)[0], aws_secret_access_key="not-" + secret
        ).list_buckets()
    stack.store.list_keys(stack.settings.buckets.raw)
    logs = sorted((stack.state_dir / "logs").glob("*.log"))
    assert logs, "the stack wrote no logs"
    values = _secrets(stack)
    assert secret in values
    leaking = [
        path.name for path in logs if any(v in path.read_text(errors="replace") for v in values)
    ]
    assert leaking == []
    optional = ("seaweedfs/security.toml", "seaweedfs/tls/grpc.key")
    for private in ("credentials.json", "env", "seaweedfs/s3.json", *optional):
        if private in optional and not (stack.state_dir / private).exists():
            continue
        mode = (stack.state_dir / private).stat().st_mode & 0o777
        assert mode == 0o600, f"{private} has mode {oct(mode)}"


# --------------------------------------------------------------------------- ONNX only


def _serving_sources() -> list[Path]:
    files = sorted((ROOT / "readmission" / "serving").glob("*.py"))
    files += sorted((ROOT / "functions" / "predict").rglob("*.py"))
    return files


def _imports(path: Path) -> set[str]:
    return imported_modules(ast.parse(path.read_text(), filename=str(path)))


def _project_closure(paths: list[Path]) -> dict[Path, set[str]]:
    """Imports of the given files and of every project module they import, transitively."""
    seen: dict[Path, set[str]] = {}
    todo = list(paths)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen[path] = _imports(path)
        for module in seen[path]:
            stem = ROOT / module.replace(".", "/")
            for candidate in (stem.with_suffix(".py"), stem / "__init__.py"):
                if module.split(".")[0] in {"readmission", "events"} and candidate.exists():
                    todo.append(candidate)
    return seen


def test_the_serving_code_never_imports_an_unpickler() -> None:
    sources = _serving_sources()
    assert ROOT / "functions/predict/main.py" in sources and len(sources) >= 2
    bad = {
        str(path.relative_to(ROOT)): sorted(m for m in imports if m.split(".")[0] in UNPICKLERS)
        for path, imports in _project_closure(sources).items()
    }
    assert {name: mods for name, mods in bad.items() if mods} == {}
    text = "\n".join(path.read_text() for path in sources)
    assert "InferenceSession" in text  # models are run by onnxruntime
    assert not re.search(r"allow_pickle\s*=\s*True|\.load\(\s*open\(|torch\.load", text)


@pytest.mark.stack
def test_the_running_predict_process_has_no_pipeline_libraries(stack: Any) -> None:
    if not stack.has_function("predict"):
        pytest.skip("predict is not running in this stack")
    pids = [pid for pid, name in _stack_pids(stack).items() if name == "predict"]
    assert pids
    mapped = "\n".join(Path(f"/proc/{pid}/maps").read_text() for pid in pids)
    # the check sees native libraries of the processes (onnxruntime only once a worker has a
    # model to build a session for: gunicorn's master never imports it)
    assert "/numpy/" in mapped
    for library in ("sklearn", "pandas", "pyarrow", "scipy"):
        assert f"/{library}/" not in mapped, f"predict process has {library} loaded"
    # pure-Python packages do not show in maps: import the app as functions-framework does
    probe = (
        "import sys, functions_framework as ff;"
        "ff.create_app(target='predict', source='functions/predict/main.py', "
        "signature_type='http');"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[1:])))"
    )
    env = {**os.environ, **stack.env, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = set(ast.literal_eval(result.stdout.strip().splitlines()[-1]))
    # numpy imports the stdlib pickle module for its own arrays; nothing else may come in
    assert loaded - {"pickle", "_pickle"} == set()


# --------------------------------------------------------------------------- body limits


def _post_big(
    url: str, headers: dict[str, str], size: int = OVER_LIMIT, timeout: float = 60
) -> int | str:
    """POST a body of ``size`` bytes; the status, or what went wrong (never hangs)."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    path = "/" + url.split("//", 1)[1].split("/", 1)[1] if url.count("/") > 2 else "/"
    body_head, body_tail = b'{"bucket": "raw", "key": "', b'.csv"}'
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {size}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        + "Connection: close\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=timeout) as conn:
        conn.sendall(head.encode())
        # a valid JSON event naming an absurd key: refused for its size, not for its syntax
        padding = size - len(body_head) - len(body_tail)
        pieces = [body_head, *[b"x" * 65536] * (padding // 65536), b"x" * (padding % 65536)]
        try:
            for piece in [*pieces, body_tail]:
                conn.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server refused early and closed: read what it answered
        try:
            reply = conn.recv(4096)
        except (ConnectionResetError, TimeoutError) as exc:
            return type(exc).__name__
    match = re.match(rb"HTTP/1\.[01] (\d{3})", reply)
    return int(match.group(1)) if match else f"no HTTP answer: {reply[:60]!r}"


CE_HEADERS = {
    "ce-specversion": "1.0",
    "ce-id": "oversized-1",
    "ce-source": "tests/test_security",
    "content-type": "application/json",
}
EVENT_TYPES = {
    "ingest": "io.readmission.raw.created",
    "train": "io.readmission.job.created",
    "aggregate": "io.readmission.result.created",
    "dead-letter": "io.readmission.raw.created",
    "score": "io.readmission.scoring.created",
    "outcomes": "io.readmission.outcomes.created",
}


@pytest.mark.stack
def test_adapter_and_broker_refuse_oversized_bodies(stack: Any) -> None:
    adapter = stack.function_urls["events-adapter"][0] + "/"
    token = json.loads((stack.state_dir / "credentials.json").read_text()).get("webhook_token")
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    assert _post_big(adapter, {"content-type": "application/json", **auth}) in {400, 413}
    if token:  # without the token: refused before the body is read
        assert _post_big(adapter, {"content-type": "application/json"}) == 401
    assert _post_big(stack.broker_url + "/", {**CE_HEADERS, "ce-type": "x"}) in {400, 413}


@pytest.mark.stack
@pytest.mark.parametrize(
    "service",
    [
        "aggregate",
        "dead-letter",
        "ingest",
        "score",
        "outcomes",
        "train",
    ],
)
def test_event_functions_refuse_oversized_bodies(stack: Any, service: str) -> None:
    if not stack.has_function(service):
        pytest.skip(f"{service} is not running in this stack")
    url = stack.function_urls[service][0] + "/"
    status = _post_big(url, {**CE_HEADERS, "ce-type": EVENT_TYPES[service]})
    assert status in {400, 413}, f"{service} answered {status} to an {OVER_LIMIT}-byte event"


@pytest.mark.stack
def test_predict_refuses_oversized_bodies(stack: Any) -> None:
    if not stack.predict_url:
        pytest.skip("predict is not running in this stack")
    for path in ("/predict", "/predict/batch"):
        status = _post_big(stack.predict_url + path, {"content-type": "application/json"})
        assert status in {400, 413}, f"{path}: {status}"


# --------------------------------------------------------------------------- the web page

UNSAFE_SINKS = re.compile(
    r"\.innerHTML\b|\.outerHTML\b|insertAdjacentHTML|document\.write(?:ln)?\s*\(|"
    r"\beval\s*\(|new\s+Function\s*\(|setTimeout\s*\(\s*['\"`]|\.srcdoc\b|"
    r"createContextualFragment|DOMParser"
)


def _strip_js_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"(?m)(^|[^:])//.*$", r"\1", text)


def test_the_predict_page_writes_data_as_text_only() -> None:
    static = ROOT / "functions" / "predict" / "static"
    scripts = sorted(static.glob("*.js"))
    assert scripts, "no JavaScript in functions/predict/static"
    for path in scripts:
        code = _strip_js_comments(path.read_text())
        assert not UNSAFE_SINKS.findall(code), f"{path.name}: {UNSAFE_SINKS.findall(code)}"
        assert "textContent" in code
    for page in static.glob("*.html"):
        html = page.read_text()
        inline = re.findall(r"<script(?![^>]*\bsrc=)[^>]*>\s*\S", html)
        assert inline == [], f"{page.name} has inline script (the CSP forbids it)"
        assert not re.search(r"\son[a-z]+\s*=", html), f"{page.name} has inline event handlers"


def test_the_sink_check_catches_unsafe_code() -> None:
    for sample in ("el.innerHTML = data", "document.write(x)", "n.insertAdjacentHTML('a', b)"):
        assert UNSAFE_SINKS.search(_strip_js_comments(sample)), sample


@pytest.mark.stack
def test_the_predict_page_is_served_with_a_strict_csp(stack: Any) -> None:
    if not stack.predict_url:
        pytest.skip("predict is not running in this stack")
    with urllib.request.urlopen(stack.predict_url + "/", timeout=30) as response:
        policy = response.headers.get("Content-Security-Policy", "")
        assert response.headers.get("X-Content-Type-Options") == "nosniff"
    assert "default-src 'self'" in policy and "'unsafe-inline'" not in policy
