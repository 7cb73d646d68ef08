"""SeaweedFS for the local stack: credentials, S3 identities, filer webhook, command line.

* ``credentials.json`` (mode 0600): a generated access/secret key pair and webhook token,
  reused on restart.
* ``s3.json`` (mode 0600): the S3 identities file; only that key pair is allowed, so anonymous
  and wrong-key requests are refused.
* ``notification.toml`` (mode 0600): ``[notification.webhook]`` posting every filer change to
  the events adapter with a generated bearer token (the adapter's ``ADAPTER_TOKEN``). The
  filer reads it from its working directory, so SeaweedFS runs in that folder.
* ``security.toml`` (mode 0600): JWT signing keys, fresh at every start, so the filer's and
  the volume server's own HTTP APIs refuse unsigned reads and writes (401): only the S3
  gateway, which signs its requests, reaches the data. Directory metadata and the volume UI are
  not exposed. With a ``GrpcTls`` (readmission.localstack.seaweed_tls), every gRPC port
  requires a client certificate signed by the stack's fresh CA, so ``weed shell`` and other
  gRPC clients without it cannot rename, delete or look up anything.
* every port SeaweedFS opens is given explicitly and bound to 127.0.0.1; the Iceberg and Lance
  catalogue ports are disabled and telemetry is off.
"""

from __future__ import annotations

import json
import secrets
import string
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from readmission.localstack.private_files import write_private
from readmission.localstack.seaweed_tls import GrpcTls

SEAWEED_PORTS = ("master", "volume", "filer", "s3")
_KEY_ALPHABET = string.ascii_uppercase + string.digits


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str
    webhook_token: str = ""


def load_or_create_credentials(path: Path) -> Credentials:
    if path.exists():
        info = json.loads(path.read_text())
        if info.get("webhook_token"):
            return Credentials(info["access_key"], info["secret_key"], info["webhook_token"])
    credentials = Credentials(
        access_key="RA" + "".join(secrets.choice(_KEY_ALPHABET) for _ in range(18)),
        secret_key=secrets.token_urlsafe(30),
        webhook_token=secrets.token_urlsafe(24),
    )
    write_private(
        path,
        json.dumps(
            {
                "access_key": credentials.access_key,
                "secret_key": credentials.secret_key,
                "webhook_token": credentials.webhook_token,
            }
        ),
    )
    return credentials


def write_identities(path: Path, credentials: Credentials) -> None:
    identities = {
        "identities": [
            {
                "name": "readmission",
                "credentials": [
                    {"accessKey": credentials.access_key, "secretKey": credentials.secret_key}
                ],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    write_private(path, json.dumps(identities, indent=2))


def write_notification_config(path: Path, webhook_url: str, bearer_token: str = "") -> None:
    write_private(
        path,
        "# Written by readmission.localstack: every filer change is POSTed to the events adapter.\n"
        "[notification.webhook]\n"
        "enabled = true\n"
        f'endpoint = "{webhook_url}"\n'
        f'bearer_token = "{bearer_token}"\n'
        "timeout_seconds = 30\n"
        "max_retries = 10\n"
        "backoff_seconds = 1\n"
        "max_backoff_seconds = 10\n"
        "workers = 1\n"  # one at a time: events reach the broker in write order
        "buffer_size = 10000\n"
        'path_prefixes = ["/buckets"]\n',
    )


def write_security_config(path: Path, grpc_tls: GrpcTls | None = None) -> None:
    """JWT keys for volume and filer HTTP reads and writes (``weed scaffold -config=security``)
    and, with `grpc_tls`, mutual TLS on every gRPC port (server side and client side)."""
    sections = ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")
    text = "# Written by readmission.localstack: fresh keys at every start.\n"
    for section in sections:
        text += f'[{section}]\nkey = "{secrets.token_urlsafe(32)}"\nexpires_after_seconds = 60\n'
    text += "[access]\nui = false\n[filer.expose_directory_metadata]\nenabled = false\n"
    if grpc_tls is not None:
        pair = f'cert = "{grpc_tls.cert}"\nkey = "{grpc_tls.key}"\n'
        text += f'[grpc]\nca = "{grpc_tls.ca}"\n'
        for component in SEAWEED_PORTS:  # every component opens a gRPC port
            text += f"[grpc.{component}]\n{pair}"
        text += f"[grpc.client]\n{pair}"
    write_private(path, text)


def server_command(
    weed: str, data_dir: Path, identities: Path, ports: dict[str, int], host: str = "127.0.0.1"
) -> list[str]:
    """``weed server`` with master, volume, filer and S3, every port explicit (gRPC included)."""
    command = [
        weed,
        "server",
        f"-ip={host}",
        f"-ip.bind={host}",
        f"-dir={data_dir}",
        "-filer",
        "-s3",
        f"-s3.config={identities}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=256",
        "-volume.max=0",
        "-volume.preStopSeconds=1",  # default 10: `down` would wait for it
    ]
    for name in SEAWEED_PORTS:
        command += [f"-{name}.port={ports[name]}", f"-{name}.port.grpc={ports[name + '.grpc']}"]
    return command


def grow_volumes(master_url: str, buckets: Iterable[str], timeout: float = 10.0) -> list[str]:
    """Have SeaweedFS create each bucket's volumes now, so that the first object written to a
    bucket does not wait ~0.2 s for them. Asks the master for a file id in each bucket's
    collection (`/dir/assign`, which creates the volumes if the collection has none, and
    nothing else: the id is never written). Returns the buckets it could not prepare (their
    first write creates the volumes, as without this)."""
    failed = []
    for bucket in buckets:
        url = f"{master_url}/dir/assign?{urllib.parse.urlencode({'collection': bucket})}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as reply:
                answer = json.loads(reply.read() or b"{}")
        except (OSError, ValueError):
            answer = {}
        if not answer.get("fid"):
            failed.append(bucket)
    return failed
