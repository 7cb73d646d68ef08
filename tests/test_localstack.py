"""Integration tests of the real local stack: auth, loopback-only ports, the event path."""

from __future__ import annotations

import base64
import json
import os
import stat
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import botocore
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent
from support.stack import RunningStack, next_version, running_stack, version_of

from events.notifications import RAW_CREATED, event_id
from readmission import keys
from readmission.dataset import ensure_dataset, read_dataset_bytes
from readmission.keys import (
    batch_key,
    content_id,
    dead_letter_key,
    job_key,
    manifest_key,
    rejected_report_key,
    validation_key,
)
from readmission.localstack import seaweed
from readmission.localstack.processes import recorded

pytestmark = pytest.mark.stack


def _client(stack: RunningStack, access: str, secret: str, anonymous: bool = False) -> object:
    return boto3.client(
        "s3",
        endpoint_url=stack.s3_url,
        region_name="us-east-1",
        aws_access_key_id=access,
        aws_secret_access_key=secret,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1},
            signature_version=botocore.UNSIGNED if anonymous else None,
        ),
    )


def _error_code(call: object) -> str:
    with pytest.raises(ClientError) as caught:
        call()  # type: ignore[operator]
    return str(caught.value.response["Error"]["Code"])


def test_s3_requires_the_generated_keys(stack: RunningStack) -> None:
    raw = stack.settings.buckets.raw
    anonymous = _client(stack, "x", "y", anonymous=True)
    assert _error_code(anonymous.list_buckets) == "AccessDenied"
    assert (
        _error_code(lambda: anonymous.put_object(Bucket=raw, Key="anon.csv", Body=b"a\n"))
        == "AccessDenied"
    )
    access, secret = stack.env["AWS_ACCESS_KEY_ID"], stack.env["AWS_SECRET_ACCESS_KEY"]
    wrong_secret = _client(stack, access, secret + "x")
    assert _error_code(wrong_secret.list_buckets) == "SignatureDoesNotMatch"
    wrong_key = _client(stack, "NOSUCHKEY0000000000", secret)
    assert _error_code(wrong_key.list_buckets) in {"InvalidAccessKeyId", "AccessDenied"}
    names = {b["Name"] for b in _client(stack, access, secret).list_buckets()["Buckets"]}
    assert set(stack.settings.buckets.all()) <= names
    secret_files = ("credentials.json", "env", "stack.json", "seaweedfs/s3.json")
    for secret_file in (*secret_files, "seaweedfs/notification.toml"):
        mode = stat.S_IMODE((stack.state_dir / secret_file).stat().st_mode)
        assert mode == 0o600, f"{secret_file} has mode {oct(mode)}"


def _http_status(method: str, url: str, body: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _collections(master: str) -> set[str]:
    """The collections that have volumes, from the SeaweedFS master's /vol/status."""
    with urllib.request.urlopen(f"{master}/vol/status", timeout=10) as reply:
        topology = json.loads(reply.read())["Volumes"]["DataCenters"]
    return {
        volume["Collection"]
        for racks in topology.values()
        for servers in racks.values()
        for volumes in servers.values()
        for volume in volumes
    }


def test_every_bucket_has_its_volumes_before_its_first_write(stack: RunningStack) -> None:
    """`up` has SeaweedFS create each bucket's volumes (seaweed.grow_volumes), so no first
    write waits for them; grow_volumes creates them without writing anything."""
    master = f"http://127.0.0.1:{stack.ports['master']}"
    assert set(stack.settings.buckets.all()) <= _collections(master)
    assert "volumes-probe" not in _collections(master)
    assert seaweed.grow_volumes(master, ["volumes-probe"]) == []
    assert "volumes-probe" in _collections(master)
    unreachable = "http://127.0.0.1:9"  # discard port: nothing listens
    assert seaweed.grow_volumes(unreachable, ["raw"], timeout=1) == ["raw"]


def test_filer_and_volume_http_apis_refuse_unsigned_requests(stack: RunningStack) -> None:
    raw = stack.settings.buckets.raw
    stack.store.put_bytes(raw, "jwt-check.csv", b"a,b\n1,2\n")
    filer, volume = stack.filer_url, f"http://127.0.0.1:{stack.ports['volume']}"
    assert _http_status("GET", f"{filer}/buckets/{raw}/jwt-check.csv") == 401
    assert _http_status("GET", f"{filer}/buckets/") == 401
    assert _http_status("PUT", f"{filer}/buckets/{raw}/sneaky.csv", b"x") == 401
    assert _http_status("GET", f"{volume}/1,01") == 401
    assert not stack.store.exists(raw, "sneaky.csv")
    assert stack.store.get_bytes(raw, "jwt-check.csv") == b"a,b\n1,2\n"  # S3 still works
    mode = stat.S_IMODE((stack.state_dir / "seaweedfs" / "security.toml").stat().st_mode)
    assert mode == 0o600


def _listening(pids: set[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket those processes listen on (from /proc)."""
    inodes = set()
    for pid in pids:
        with_fds = Path(f"/proc/{pid}/fd")
        try:
            links = [os.readlink(fd) for fd in with_fds.iterdir()]
        except OSError:
            continue
        inodes |= {link[8:-1] for link in links if link.startswith("socket:[")}
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A = LISTEN
                continue
            address, port = fields[1].split(":")
            if width == 8:
                octets = bytes.fromhex(address)[::-1]
                host = ".".join(str(b) for b in octets)
            else:
                host = "ipv6:" + address
            found.add((host, int(port, 16)))
    return found


def _stack_pids(stack: RunningStack) -> set[int]:
    groups = {p.pid for p in recorded(stack.state_dir / "run")}
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) in groups:  # field 5 of stat: the process group
            pids.add(int(entry.name))
    return pids


def test_every_listening_port_is_on_loopback(stack: RunningStack) -> None:
    sockets = _listening(_stack_pids(stack))
    assert sockets, "no listening socket found for the stack's processes"
    assert {host for host, _ in sockets} == {"127.0.0.1"}, sockets
    ports = {port for _, port in sockets}
    expected = {port for name, port in stack.ports.items() if name not in stack.info.failed}
    assert expected <= ports, f"not listening: {expected - ports}"


def test_the_stack_prometheus_scrapes_predict_with_the_manifest_rules(
    stack: RunningStack,
) -> None:
    url = stack.env.get("PROMETHEUS_URL")
    if url is None:
        pytest.skip("prometheus is not installed (apt-get install prometheus)")

    def predict_target() -> dict | None:
        with urllib.request.urlopen(f"{url}/api/v1/targets", timeout=5) as response:
            targets = json.loads(response.read())["data"]["activeTargets"]
        up = [t for t in targets if t["labels"]["job"] == "predict" and t["health"] == "up"]
        return up[0] if up else None

    target = stack.wait_for(predict_target, timeout=30)
    assert target is not None and target["scrapeUrl"] == f"{stack.env['PREDICT_URL']}/metrics"
    with urllib.request.urlopen(f"{url}/api/v1/rules", timeout=5) as response:
        groups = json.loads(response.read())["data"]["groups"]
    alerts = {rule["name"] for group in groups for rule in group["rules"]}
    assert {"PredictHighErrorRate", "ReadmissionFeatureDrift"} <= alerts


def test_csv_upload_travels_webhook_adapter_broker_to_a_function(stack: RunningStack) -> None:
    raw = stack.settings.buckets.raw
    body = b"this is not the diabetes data\n1,2,3\n"
    key = "integration/not data.csv"
    stack.store.put_bytes(raw, key, body, "text/csv")
    head = stack.store.head(raw, key)
    assert head is not None
    expected_id = event_id(raw, key, head.etag)

    if stack.has_function("ingest"):
        # ingest rejects a file that is not the contract's CSV and writes an error report
        report = rejected_report_key(content_id(body), key)
        found = stack.wait_for(
            lambda: stack.store.exists(stack.settings.buckets.rejected, report), timeout=120
        )
        assert found, f"no rejection report {report}; ingest log:\n{stack.log('ingest')}"
    else:
        # no ingest replica: retried by the broker, then stored by the dead-letter function
        letter = dead_letter_key(RAW_CREATED, expected_id)
        document = stack.wait_for(
            lambda: stack.store.get_json_if_exists(stack.settings.buckets.dead_letter, letter),
            timeout=120,
        )
        assert document, f"no dead letter {letter}; broker log:\n{stack.log('broker')}"
        assert document["attributes"]["subject"] == key
        assert document["attributes"]["knativeerrordest"] == "ingest"
        assert document["data"]["origin"] == "seaweedfs"

    broker_log = stack.log("broker", 2000)
    assert f"id={expected_id} subscriber=ingest" in broker_log
    if stack.has_function("ingest"):
        assert stack.delivered(RAW_CREATED), stack.broker_status()


def _post_event(url: str, attributes: dict[str, str], data: dict) -> tuple[int, bytes]:
    headers, body = to_binary(CloudEvent(attributes, data))
    request = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, response.read()


def test_dead_letter_function_stores_the_event_once(stack: RunningStack) -> None:
    [url] = stack.function_urls["dead-letter"]
    attributes = {
        "specversion": "1.0",
        "id": "dl-test-1",
        "type": "io.readmission.job.created",
        "source": "s3://jobs",
        "subject": "x/00-a.json",
        "datacontenttype": "application/json",
        "knativeerrordest": "http://127.0.0.1:1/",
        "knativeerrorcode": "500",
        "knativeerrordata": base64.b64encode(b"Traceback: boom").decode(),
    }
    assert _post_event(url, attributes, {"bucket": "jobs", "key": "x/00-a.json"}) == (204, b"")
    bucket, key = (
        stack.settings.buckets.dead_letter,
        dead_letter_key(attributes["type"], "dl-test-1"),
    )
    first = stack.store.head(bucket, key)
    document = stack.store.get_json(bucket, key)
    assert document["error"] == {
        "destination": "http://127.0.0.1:1/",
        "code": 500,
        "data": "Traceback: boom",
    }
    assert document["data"] == {"bucket": "jobs", "key": "x/00-a.json"}
    assert document["attributes"]["subject"] == "x/00-a.json"
    assert _post_event(url, attributes | {"knativeerrorcode": "503"}, {}) == (204, b"")
    assert stack.store.head(bucket, key) == first  # idempotent: the first letter stays


def test_a_malformed_event_is_answered_400_and_dead_lettered_without_retry(
    stack: RunningStack,
) -> None:
    if not stack.has_function("ingest"):
        pytest.skip("functions/ingest/main.py is not there (or did not start)")
    attributes = {
        "specversion": "1.0",
        "id": "malformed-raw-1",
        "type": RAW_CREATED,
        "source": "s3://raw",
        "subject": "x.csv",
        "datacontenttype": "application/json",
    }
    assert _post_event(stack.broker_url, attributes, {"nothing": "useful"})[0] == 202
    letter = dead_letter_key(RAW_CREATED, "malformed-raw-1")
    document = stack.wait_for(
        lambda: stack.store.get_json_if_exists(stack.settings.buckets.dead_letter, letter),
        timeout=60,
    )
    assert document, f"not dead-lettered; broker log:\n{stack.log('broker')}"
    assert document["error"]["code"] == 400
    assert document["error"]["destination"] in stack.function_urls["ingest"]
    attempts = [
        line
        for line in stack.log("broker", 5000).splitlines()
        if "id=malformed-raw-1 subscriber=ingest" in line
    ]
    assert len(attempts) == 1, attempts


def test_the_reconcile_pingsource_reaches_its_function(stack: RunningStack) -> None:
    if not stack.has_function("reconcile"):
        pytest.skip("functions/reconcile/main.py is not there (or did not start)")
    assert stack.fire_pingsource("reconcile-every-5m") == 202
    delivered = stack.wait_for(
        lambda: any(
            "type=dev.knative.sources.ping" in line and "outcome=delivered" in line
            for line in stack.log("broker", 5000).splitlines()
        ),
        timeout=60,
    )
    assert delivered, f"ping not delivered; broker log:\n{stack.log('broker')}"


def test_the_real_csv_through_real_notifications_gives_batches_and_n_x_5_jobs(
    tmp_path: Path,
) -> None:
    """The whole real file, uploaded to the raw bucket of a stack of its own: the filer
    webhook, the adapter and the broker fire ingest, which appends it to the (empty) corpus as
    its first version: the manifest, the Parquet batches and one job spec per (cumulative set,
    algorithm). The stack stops right after, so the fan-out it starts is cut short."""
    data = read_dataset_bytes(ensure_dataset())
    with running_stack(tmp_path / "state", {"TRAIN_WORKERS": "1"}) as own:
        buckets = own.settings.buckets
        expected_version = next_version(own, data)  # parent None: the corpus is empty
        own.store.put_bytes(buckets.raw, "uploads/diabetic_data.csv", data, "text/csv")
        dataset_id = version_of(own, data, timeout=180)
        assert dataset_id == expected_version
        manifest = own.store.get_json(buckets.datasets, manifest_key(dataset_id))
        assert (manifest["number"], manifest["parent"], manifest["reused_sets"]) == (1, None, 0)
        assert manifest["drops"] == [content_id(data)]
        n_sets = len(manifest["cumulative_sets"])
        algorithms = list(own.settings.algorithms)
        assert (n_sets, len(algorithms)) == (5, 5)
        assert manifest["rows"] == {
            "total": 101_766,
            "train": 71_246,
            "validation": 15_327,
            "test": 15_193,
        }
        assert [b["rows"] for b in manifest["batches"]] == [15_000] * 4 + [11_246]
        assert manifest["validation"] == {"keys": [validation_key(dataset_id)], "rows": 15_327}
        assert manifest["test"] == {"keys": [keys.test_key(dataset_id)], "rows": 15_193}
        for key in [batch_key(dataset_id, i) for i in range(n_sets)] + [
            validation_key(dataset_id),
            keys.test_key(dataset_id),  # imported bare, pytest would collect it
            keys.encounters_key(dataset_id),
        ]:
            assert own.store.exists(buckets.datasets, key), key
        head = own.store.get_json(buckets.datasets, keys.CORPUS_HEAD_KEY)
        assert head == {"version": dataset_id, "number": 1}
        expected = {job_key(dataset_id, i, a) for i in range(n_sets) for a in algorithms}
        jobs = own.wait_for(
            lambda: set(own.store.list_keys(buckets.jobs, f"{dataset_id}/")) >= expected,
            timeout=60,
        )
        assert jobs, "the 25 job specs did not all appear"
        assert set(own.store.list_keys(buckets.jobs, f"{dataset_id}/")) == expected
        assert own.delivered(RAW_CREATED), own.broker_status()
