"""Configuration of the local stack: functions, ports, the saved StackInfo, client env."""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from readmission import env
from readmission.config import Settings
from readmission.localstack import processes, prometheus, seaweed

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"


@dataclass(frozen=True)
class FunctionSpec:
    service: str  # the Knative Service name (the broker's routing key)
    source: str  # relative to the repo
    target: str
    signature: str  # "http" or "cloudevent"


# The Services of docs/design.md, used when infra/knative has no Service manifest for one.
FUNCTIONS = (
    FunctionSpec("events-adapter", "functions/events-adapter/main.py", "adapter", "http"),
    FunctionSpec("dead-letter", "functions/dead-letter/main.py", "dead_letter", "cloudevent"),
    FunctionSpec("ingest", "functions/ingest/main.py", "ingest", "cloudevent"),
    FunctionSpec("aggregate", "functions/aggregate/main.py", "aggregate", "cloudevent"),
    FunctionSpec("predict", "functions/predict/main.py", "predict", "http"),
    FunctionSpec("train", "functions/train/main.py", "train", "cloudevent"),
)
_FUNCTION_PORT_OFFSET = {"events-adapter": 0, "dead-letter": 1, "ingest": 2, "aggregate": 3}
_FUNCTION_PORT_OFFSET |= {"predict": 4, "reconcile": 5}
_OTHER_PORT_OFFSET = 6  # Services not in the table above, in name order (before train at 10)
_TRAIN_PORT_OFFSET = 10


def _arg(args: list[str], name: str) -> str | None:
    for index, arg in enumerate(args):
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
        if arg == name and index + 1 < len(args):
            return args[index + 1]
    return None


def functions_from_manifests(manifest_dir: Path) -> list[FunctionSpec]:
    """Knative Services whose container runs functions-framework with --target and --source."""
    from events.routing import load_documents  # the manifests' reader, shared with the broker

    specs = []
    for doc in load_documents(manifest_dir) if manifest_dir.is_dir() else []:
        if doc.get("kind") != "Service" or "serving.knative.dev" not in str(doc.get("apiVersion")):
            continue
        containers = (((doc.get("spec") or {}).get("template") or {}).get("spec") or {}).get(
            "containers"
        ) or [{}]
        args = [str(a) for a in containers[0].get("args") or []]
        target, source = _arg(args, "--target"), _arg(args, "--source")
        if target and source:
            signature = _arg(args, "--signature-type") or "http"
            specs.append(FunctionSpec(str(doc["metadata"]["name"]), source, target, signature))
    return specs


def function_specs(root: Path) -> list[FunctionSpec]:
    """The design's Services, each overridden by its manifest, plus any other manifest Service."""
    specs = {spec.service: spec for spec in FUNCTIONS}
    specs |= {spec.service: spec for spec in functions_from_manifests(root / "infra" / "knative")}
    return list(specs.values())


# Processes without which the stack is useless: `up` fails if one of them cannot start.
CORE_PROCESSES = frozenset({"seaweedfs", "mlflow", "broker", "events-adapter", "dead-letter"})


class StackError(RuntimeError):
    pass


def _tool(name: str) -> str:
    """A console script of the virtualenv that runs this code, else one on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise StackError(f"{name} not found (run scripts/lib/bootstrap.sh)")
    return found


@dataclass(frozen=True)
class StackConfig:
    root: Path
    state_dir: Path
    free_ports: bool = False
    train_workers: int = 1
    # 1: uvicorn's multi-worker mode binds a socket without IPPROTO_TCP, so asyncio never
    # sets TCP_NODELAY and every reused connection stalls on Nagle x delayed ACK; one worker
    # keeps TCP_NODELAY on.
    mlflow_workers: int = 1
    start_timeout: float = 180.0
    strict: bool = False  # a pipeline function that cannot start fails `up` (else: a warning)
    # LOCAL_RESTART (default on): the watchdog process restarts any process that dies
    restart: bool = True
    extra_env: dict[str, str] = field(default_factory=dict)  # settings for every process
    # LOCAL_PROMETHEUS (default on): a Prometheus scraping the functions, when it is installed
    prometheus: bool = True
    prometheus_scrape_seconds: float = 5.0  # PROMETHEUS_SCRAPE_SECONDS (rules evaluated as often)
    prometheus_rule_for: str = ""  # PROMETHEUS_RULE_FOR: replaces every alert's `for:` if set

    @classmethod
    def from_env(
        cls,
        root: Path = ROOT,
        state_dir: Path | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> StackConfig:
        """From os.environ; ``extra_env`` overrides it (for the stack and its processes)."""
        saved = dict(os.environ)
        try:
            os.environ.update(extra_env or {})
            return cls._from_environ(root, state_dir, dict(extra_env or {}))
        finally:
            os.environ.clear()
            os.environ.update(saved)

    @classmethod
    def _from_environ(
        cls, root: Path, state_dir: Path | None, extra_env: dict[str, str]
    ) -> StackConfig:
        state = state_dir or Path(env.text("STATE_DIR") or root / ".state")
        return cls(
            root=root,
            state_dir=(root / state if not state.is_absolute() else state).resolve(),
            free_ports=env.text("LOCAL_PORTS").lower() == "free",
            train_workers=env.integer("TRAIN_WORKERS", os.cpu_count() or 1, minimum=1),
            mlflow_workers=env.integer("MLFLOW_WORKERS", cls.mlflow_workers, minimum=1),
            start_timeout=env.seconds("STACK_START_TIMEOUT", cls.start_timeout),
            strict=env.flag("STACK_STRICT", cls.strict),
            restart=env.flag("LOCAL_RESTART", cls.restart),
            extra_env=extra_env,
            prometheus=env.flag("LOCAL_PROMETHEUS", cls.prometheus),
            prometheus_scrape_seconds=env.seconds(
                "PROMETHEUS_SCRAPE_SECONDS", cls.prometheus_scrape_seconds
            ),
            prometheus_rule_for=env.text("PROMETHEUS_RULE_FOR"),
        )

    def path(self, *parts: str) -> Path:
        return self.state_dir.joinpath(*parts)

    def present_functions(self) -> list[FunctionSpec]:
        return [spec for spec in function_specs(self.root) if (self.root / spec.source).exists()]

    def missing_functions(self) -> list[FunctionSpec]:
        return [
            spec for spec in function_specs(self.root) if not (self.root / spec.source).exists()
        ]

    def process_names(self) -> list[str]:
        names = []
        for spec in self.present_functions():
            if spec.service == "train":
                names += [f"train-{i}" for i in range(1, self.train_workers + 1)]
            else:
                names.append(spec.service)
        return names

    def runs_prometheus(self) -> bool:
        return self.prometheus and prometheus.binary() is not None


def assign_ports(config: StackConfig) -> dict[str, int]:
    functions = config.process_names()
    if config.free_ports:
        names = [f"{n}{s}" for n in seaweed.SEAWEED_PORTS for s in ("", ".grpc")]
        names += ["mlflow", "broker", "jobsink", *functions]
        names += ["prometheus"] if config.runs_prometheus() else []
        return dict(zip(names, processes.free_ports(len(names)), strict=True))
    ports = {
        "s3": env.integer("S3_PORT", 8333),
        "filer": env.integer("FILER_PORT", 8888),
        "master": env.integer("MASTER_PORT", 9333),
        "volume": env.integer("VOLUME_PORT", 9340),
    }
    ports.update({f"{name}.grpc": port + 10000 for name, port in list(ports.items())})
    ports["mlflow"] = env.integer("MLFLOW_PORT", 5000)
    ports["broker"] = env.integer("BROKER_PORT", 8100)
    ports["jobsink"] = env.integer("JOBSINK_PORT", 8099)
    if config.runs_prometheus():
        ports["prometheus"] = env.integer("PROMETHEUS_PORT", 9090)
    base = env.integer("FUNCTIONS_PORT", 8101)
    others = sorted(n for n in functions if n not in _FUNCTION_PORT_OFFSET and "train-" not in n)
    for name in functions:
        if name.startswith("train-"):
            ports[name] = base + _TRAIN_PORT_OFFSET + int(name.split("-")[1]) - 1
        elif name in _FUNCTION_PORT_OFFSET:
            ports[name] = base + _FUNCTION_PORT_OFFSET[name]
        else:
            ports[name] = base + _OTHER_PORT_OFFSET + others.index(name)
    return ports


def _write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Readers (the broker) see the old or the new file, never half of one."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.chmod(mode)
    partial.replace(path)


@dataclass
class StackInfo:
    """What a client needs to use a running stack (saved as STATE_DIR/stack.json)."""

    state_dir: str
    ports: dict[str, int]
    services: dict[str, list[str]]
    env: dict[str, str]
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    @property
    def s3_url(self) -> str:
        return self.env["S3_ENDPOINT_URL"]

    @property
    def broker_url(self) -> str:
        return self.env["BROKER_URL"]

    @property
    def mlflow_uri(self) -> str:
        return self.env["MLFLOW_TRACKING_URI"]

    @property
    def filer_url(self) -> str:
        return f"http://{HOST}:{self.ports['filer']}"

    def save(self) -> None:
        document = json.dumps(asdict(self), indent=2)  # holds the keys: owner only
        _write_atomic(Path(self.state_dir, "stack.json"), document, 0o600)

    @classmethod
    def load(cls, state_dir: Path) -> StackInfo:
        path = state_dir / "stack.json"
        if not path.exists():
            raise StackError(f"no stack in {state_dir} (run: python -m readmission.localstack up)")
        return cls(**json.loads(path.read_text()))


def client_env(
    config: StackConfig, ports: dict[str, int], credentials: seaweed.Credentials
) -> dict[str, str]:
    """The env vars a client of the stack needs (written to STATE_DIR/env)."""
    s3 = f"http://{HOST}:{ports['s3']}"
    region = config.extra_env.get("AWS_REGION") or os.environ.get("AWS_REGION", "").strip()
    env = dict(config.extra_env)
    env |= {
        "STATE_DIR": str(config.state_dir),
        "S3_ENDPOINT_URL": s3,
        "MLFLOW_S3_ENDPOINT_URL": s3,
        "AWS_ACCESS_KEY_ID": credentials.access_key,
        "AWS_SECRET_ACCESS_KEY": credentials.secret_key,
        "AWS_REGION": region or "us-east-1",
        "AWS_DEFAULT_REGION": region or "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "MLFLOW_TRACKING_URI": f"http://{HOST}:{ports['mlflow']}",
        "BROKER_URL": f"http://{HOST}:{ports['broker']}",
        "JOBSINK_URL": f"http://{HOST}:{ports['jobsink']}",
    }
    if "predict" in ports:
        env["PREDICT_URL"] = f"http://{HOST}:{ports['predict']}"
    if "prometheus" in ports:
        env["PROMETHEUS_URL"] = f"http://{HOST}:{ports['prometheus']}"
    return env


def settings_for(env: dict[str, str]) -> Settings:
    saved = dict(os.environ)
    try:
        os.environ.update(env)
        return Settings.from_env()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def store_for(env: dict[str, str]) -> Any:
    """An ObjectStore with the stack's endpoint and credentials (without touching os.environ)."""
    from readmission.storage import ObjectStore

    return ObjectStore.connect(
        env["S3_ENDPOINT_URL"],
        env.get("AWS_REGION", "us-east-1"),
        env["AWS_ACCESS_KEY_ID"],
        env["AWS_SECRET_ACCESS_KEY"],
    )
