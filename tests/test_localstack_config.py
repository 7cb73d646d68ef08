"""The supervisor's configuration (readmission/localstack/config.py), without starting anything."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from readmission.localstack import prometheus
from readmission.localstack.config import (
    StackConfig,
    assign_ports,
    client_env,
    function_specs,
    functions_from_manifests,
)
from readmission.localstack.progress import Snapshot, done_condition
from readmission.localstack.seaweed import Credentials

ROOT = Path(__file__).resolve().parents[1]


def test_function_entry_points_come_from_the_service_manifests(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "infra", tmp_path / "infra")
    (tmp_path / "infra" / "knative" / "extra.yaml").write_text(
        "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata: {name: extra}\n"
        "spec: {template: {spec: {containers: [{args: ['--target', 'go', "
        "'--source=functions/extra/main.py', '--signature-type=cloudevent']}]}}}\n"
    )
    specs = {spec.service: spec for spec in function_specs(tmp_path)}
    assert specs["extra"].target == "go" and specs["extra"].signature == "cloudevent"
    assert specs["extra"].source == "functions/extra/main.py"
    # from the design table
    assert specs["events-adapter"].source == "functions/events-adapter/main.py"
    from_manifests = {s.service: s for s in functions_from_manifests(ROOT / "infra" / "knative")}
    for name, spec in from_manifests.items():  # the manifest wins over the design table
        assert specs[name] == spec


def test_a_missing_function_file_is_skipped_not_started(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "infra", tmp_path / "infra")
    (tmp_path / "functions" / "events-adapter").mkdir(parents=True)
    (tmp_path / "functions" / "events-adapter" / "main.py").write_text("")
    config = StackConfig.from_env(root=tmp_path, extra_env={"TRAIN_WORKERS": "3"})
    assert [s.service for s in config.present_functions()] == ["events-adapter"]
    assert "train" in {s.service for s in config.missing_functions()}
    assert config.process_names() == ["events-adapter"]


def test_train_replicas_get_their_own_ports_and_free_mode_gives_distinct_ports() -> None:
    config = StackConfig.from_env(root=ROOT, extra_env={"TRAIN_WORKERS": "3", "LOCAL_PORTS": ""})
    ports = assign_ports(config)
    trains = [ports[n] for n in config.process_names() if n.startswith("train-")]
    if trains:
        assert trains == [8111, 8112, 8113]
    assert ports["s3"] == 8333 and ports["s3.grpc"] == 18333 and ports["broker"] == 8100
    assert len(set(ports.values())) == len(ports)
    free = assign_ports(StackConfig.from_env(root=ROOT, extra_env={"LOCAL_PORTS": "free"}))
    assert len(set(free.values())) == len(free)
    assert free.keys() >= {"s3", "s3.grpc", "filer", "master", "volume", "mlflow", "broker"}


def test_prometheus_gets_a_port_and_a_url_only_when_installed_and_wanted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PROMETHEUS_PORT", "9191")  # ports are read when assigned
    config = StackConfig.from_env(root=ROOT, extra_env={"LOCAL_PORTS": ""})
    ports = assign_ports(config)
    env = client_env(config, ports, Credentials("a", "b", "c"))
    if prometheus.binary() is None:
        assert "prometheus" not in ports and "PROMETHEUS_URL" not in env
    else:
        assert ports["prometheus"] == 9191
        assert env["PROMETHEUS_URL"] == "http://127.0.0.1:9191"
    off = StackConfig.from_env(root=ROOT, extra_env={"LOCAL_PROMETHEUS": "off"})
    assert "prometheus" not in assign_ports(off)


def test_the_stack_switches_take_every_flag_spelling_and_name_a_bad_one() -> None:
    on = {"STACK_STRICT": "on", "LOCAL_RESTART": "yes", "LOCAL_PROMETHEUS": "1"}
    config = StackConfig.from_env(root=ROOT, extra_env=on)
    assert (config.strict, config.restart, config.prometheus) == (True, True, True)
    off = {"STACK_STRICT": "0", "LOCAL_RESTART": "no", "LOCAL_PROMETHEUS": "Off"}
    config = StackConfig.from_env(root=ROOT, extra_env=off)
    assert (config.strict, config.restart, config.prometheus) == (False, False, False)
    with pytest.raises(ValueError, match=r"LOCAL_RESTART must be one of .* got 'sometimes'"):
        StackConfig.from_env(root=ROOT, extra_env={"LOCAL_RESTART": "sometimes"})
    with pytest.raises(ValueError, match="TRAIN_WORKERS must be an integer, got 'two'"):
        StackConfig.from_env(root=ROOT, extra_env={"TRAIN_WORKERS": "two"})


def test_the_local_rules_are_the_manifest_rules_with_for_replaced_on_request(
    tmp_path: Path,
) -> None:
    manifest = yaml.safe_load((ROOT / "infra" / "monitoring" / "prometheusrule.yaml").read_text())
    config = prometheus.write_config(tmp_path, ROOT, {"predict": ["127.0.0.1:1"]}, 2.5)
    written = yaml.safe_load((tmp_path / "rules.yml").read_text())
    assert written == {"groups": manifest["spec"]["groups"]}
    document = yaml.safe_load(config.read_text())
    assert document["global"] == {"scrape_interval": "2500ms", "evaluation_interval": "2500ms"}
    assert document["rule_files"] == [str(tmp_path / "rules.yml")]
    (job,) = document["scrape_configs"]
    assert job["static_configs"] == [{"targets": ["127.0.0.1:1"], "labels": {"pod": "predict"}}]
    shortened = prometheus.rule_groups(ROOT, rule_for="0s")
    alerts = [rule for group in shortened for rule in group["rules"] if "alert" in rule]
    assert alerts and all(rule["for"] == "0s" for rule in alerts)
    records = [rule for group in shortened for rule in group["rules"] if "record" in rule]
    assert records and all("for" not in rule for rule in records)


def _snapshot(**changes: object) -> Snapshot:
    base: dict = {
        "drop": None,
        "manifest": None,
        "jobs": 0,
        "results": 0,
        "model_metadata": False,
        "decision": None,
        "rejected": False,
        "broker": None,
    }
    return Snapshot(**(base | changes))


def test_wait_condition_follows_the_functions_that_exist(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "infra", tmp_path / "infra")
    config = StackConfig.from_env(root=tmp_path)
    what, done = done_condition(config)
    assert "raw event" in what
    broker = {"delivered_by_type": {}, "dead_lettered_by_type": {"io.readmission.raw.created": 1}}
    assert done(_snapshot(broker=broker)) and not done(_snapshot())

    (tmp_path / "functions" / "ingest").mkdir(parents=True)
    (tmp_path / "functions" / "ingest" / "main.py").write_text("")
    what, done = done_condition(config)
    assert "job spec" in what
    drop = {"version": "d1"}
    manifest = {"jobs": ["d1/00-a.json", "d1/00-b.json"]}
    assert not done(_snapshot(drop=drop, manifest=manifest, jobs=1))
    assert done(_snapshot(drop=drop, manifest=manifest, jobs=2))
    nothing_new = {"status": "nothing_new", "version": None}
    assert done(_snapshot(drop=nothing_new))  # no version: no job to wait for
    assert not done(_snapshot())  # not recorded yet

    for name in ("train", "aggregate"):
        (tmp_path / "functions" / name).mkdir()
        (tmp_path / "functions" / name / "main.py").write_text("")
    what, done = done_condition(config)
    assert "aggregated" in what
    assert not done(_snapshot(drop=drop, manifest=manifest, jobs=2, results=2))
    assert done(_snapshot(drop=drop, manifest=manifest, jobs=2, results=2, model_metadata=True))
    assert done(_snapshot(drop=nothing_new))
    assert not done(_snapshot())
