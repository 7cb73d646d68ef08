"""Starts the local stack's processes, waits until they answer, stops them."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from events.jobsink import job_sinks
from readmission.localstack import processes, prometheus, seaweed, seaweed_tls, watchdog
from readmission.localstack.config import (
    CORE_PROCESSES,
    HOST,
    StackConfig,
    StackError,
    StackInfo,
    _tool,
    _write_atomic,
    assign_ports,
    client_env,
    settings_for,
    store_for,
)
from readmission.localstack.private_files import write_private

# Each train process fits one model at a time on one core, like a Knative pod of 1 CPU.
_SINGLE_THREADED = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "VECLIB_MAXIMUM_THREADS": "1",
}

# `down` stops the events adapter first (the way in: a notification it is still forwarding gets
# its answer from a live broker), then the broker and the functions, then the MLflow server,
# then the object store they all write to. `weed server` then takes ~16 s to exit: its filer
# waits 15 s for the metadata stream of its own S3 gateway before it gives up. Nothing writes to
# it any more at that point, and it has every acknowledged write in its files already (needles
# in the volume's .dat/.idx, filer entries in leveldb's journal, written before it answers), so
# it gets SIGKILL after 3 s, as the tests' SeaweedFS server does after 1 s.
STOP_STAGES = (
    processes.StopStage(frozenset({watchdog.NAME})),  # first: it would restart the others
    processes.StopStage(frozenset({"events-adapter"})),
    processes.StopStage(None),
    processes.StopStage(frozenset({"mlflow"})),
    processes.StopStage(
        frozenset({"seaweedfs"}),
        grace=3.0,
        slow_exit="expected: its filer waits 15 s for its own S3 gateway; nothing writes to it",
    ),
)
# The predict function: one single-threaded gunicorn worker per core. Each worker is a process
# with its own interpreter lock; measured in docs/predict.md (Benchmark).
PREDICT_SERVER_ENV = {"WORKERS": str(os.cpu_count() or 1), "THREADS": "1"}
# The functions that serve /metrics (readmission/serving/metrics.py): Prometheus scrapes them.
METRICS_FUNCTIONS = ("predict",)


def _service_urls(config: StackConfig, ports: dict[str, int]) -> dict[str, list[str]]:
    services: dict[str, list[str]] = {}
    for name in config.process_names():
        service = "train" if name.startswith("train-") else name
        services.setdefault(service, []).append(f"http://{HOST}:{ports[name]}")
    return services


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\"'\"'") + "'"


class Supervisor:
    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.run_dir = config.path("run")
        self.log_dir = config.path("logs")

    def running(self) -> list[processes.Process]:
        return [p for p in processes.recorded(self.run_dir) if processes.is_running(p)]

    # up ----------------------------------------------------------------------------------
    def up(self, log: Callable[[str], None] = print) -> StackInfo:
        config = self.config
        if self.running():
            info = StackInfo.load(config.state_dir)
            log(f"stack already running in {config.state_dir}")
            return info
        for spec in config.missing_functions():
            log(f"warning: {spec.source} does not exist yet: Service {spec.service} skipped")
        config.state_dir.mkdir(parents=True, exist_ok=True)
        ports = assign_ports(config)
        self._check_ports_free(ports)
        credentials = seaweed.load_or_create_credentials(config.path("credentials.json"))
        env_for_clients = client_env(config, ports, credentials)
        services = _service_urls(config, ports)
        info = StackInfo(
            state_dir=str(config.state_dir),
            ports=ports,
            services=services,
            env=env_for_clients,
            skipped=[spec.service for spec in config.missing_functions()],
        )
        _write_atomic(config.path("services.json"), json.dumps(services, indent=2))
        write_private(
            config.path("env"),
            "".join(f"export {k}={_shell_quote(v)}\n" for k, v in env_for_clients.items()),
        )
        info.save()
        deadline = time.monotonic() + config.start_timeout
        try:
            # SeaweedFS first (the functions may read S3 as they start); the buckets last, once
            # the events adapter takes the filer's notifications of their creation
            self._start_seaweedfs(ports, credentials, env_for_clients, log)
            self._wait_ready({"seaweedfs": lambda: self._s3_ready(env_for_clients)}, deadline, log)
            checks = self._start_services(ports, credentials, env_for_clients, log)
            failed = self._wait_ready(checks, deadline, log)
            self._wait_ready(
                {"buckets": lambda: self._buckets_ready(env_for_clients)}, deadline, log
            )
            not_grown = seaweed.grow_volumes(
                f"http://{HOST}:{ports['master']}", settings_for(env_for_clients).buckets.all()
            )
            if not_grown:
                log(f"could not allocate volumes ahead for {', '.join(not_grown)}: not needed")
            if config.restart:
                log("starting watchdog   (restarts any process that dies)")
                command = [sys.executable, "-m", watchdog.__name__, str(config.state_dir)]
                self._start(watchdog.NAME, command, self._process_env(env_for_clients), config.root)
        except BaseException:
            log("start failed: stopping what was started")
            self.down(log=lambda _: None)
            raise
        self._reconcile_now(info, log)
        if failed:
            urls = {f"http://{HOST}:{ports[name]}" for name in failed}
            info.services = {
                service: [url for url in replicas if url not in urls]
                for service, replicas in services.items()
            }
            info.failed = failed
            _write_atomic(config.path("services.json"), json.dumps(info.services, indent=2))
            info.save()
        return info

    def _reconcile_now(self, info: StackInfo, log: Callable[[str], None]) -> None:
        """Fire every PingSource once: the reconciler runs on start, then on its schedule, and
        picks up what a previous run of the stack left half-done (docs/reliability.md)."""
        from events.routing import load_routing

        for source in load_routing(self.config.root / "infra" / "knative").pings:
            url = f"{info.broker_url}/pingsources/{source.name}"
            if processes.http_status(url, method="POST") not in (200, 202, 204):
                log(f"warning: could not fire PingSource {source.name} ({url})")

    def _check_ports_free(self, ports: dict[str, int]) -> None:
        busy = {name: port for name, port in ports.items() if processes.port_in_use(port)}
        if busy:
            raise StackError(
                f"ports already in use: {busy} (set the port env vars or LOCAL_PORTS=free)"
            )

    def _process_env(self, env_for_clients: dict[str, str], **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(env_for_clients)
        # mlflow.set_registry_uri() in the calling process exports MLFLOW_REGISTRY_URI: never let
        # a stale one send this stack's registrations to another server.
        env["MLFLOW_REGISTRY_URI"] = env_for_clients["MLFLOW_TRACKING_URI"]
        python_path = [str(self.config.root)]
        if env.get("PYTHONPATH"):
            python_path.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(python_path)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra)
        return env

    def _start(self, name: str, cmd: list[str], env: dict[str, str], cwd: Path) -> None:
        processes.start(name, cmd, run_dir=self.run_dir, log_dir=self.log_dir, env=env, cwd=cwd)

    def _start_seaweedfs(
        self,
        ports: dict[str, int],
        credentials: seaweed.Credentials,
        env_for_clients: dict[str, str],
        log: Callable[[str], None],
    ) -> None:
        weed_dir = self.config.path("seaweedfs")
        seaweed.write_identities(weed_dir / "s3.json", credentials)
        grpc_tls = seaweed_tls.write_grpc_certificates(weed_dir / "tls")
        # read from the working dir; fresh keys and certificates at every start
        seaweed.write_security_config(weed_dir / "security.toml", grpc_tls)
        adapter = f"http://{HOST}:{ports['events-adapter']}/" if "events-adapter" in ports else ""
        seaweed.write_notification_config(
            weed_dir / "notification.toml", adapter, credentials.webhook_token
        )
        (weed_dir / "data").mkdir(parents=True, exist_ok=True)
        command = seaweed.server_command(
            _tool("weed"), weed_dir / "data", weed_dir / "s3.json", ports
        )
        log(f"starting seaweedfs  (S3 {env_for_clients['S3_ENDPOINT_URL']})")
        self._start("seaweedfs", command, self._process_env(env_for_clients), weed_dir)

    def _start_services(
        self,
        ports: dict[str, int],
        credentials: seaweed.Credentials,
        env_for_clients: dict[str, str],
        log: Callable[[str], None],
    ) -> dict[str, Callable[[], bool]]:
        """Start broker, functions and MLflow; returns a readiness check per process."""
        config = self.config
        base_env = self._process_env(env_for_clients)
        broker_env = self._process_env(
            env_for_clients,
            BROKER_HOST=HOST,
            BROKER_PORT=str(ports["broker"]),
            BROKER_MANIFESTS=str(config.root / "infra" / "knative"),
            BROKER_SERVICES=str(config.path("services.json")),
            BROKER_DEAD_LETTER_FILE=str(config.path("dead-letters.jsonl")),
            BROKER_PINGSOURCES="off",
        )
        log(f"starting broker     ({env_for_clients['BROKER_URL']})")
        self._start("broker", [sys.executable, "-m", "events.broker"], broker_env, config.root)
        # Knative's PingSource adapter is not the broker: the reconciler's schedule survives it
        pingsource_env = self._process_env(
            env_for_clients,
            PINGSOURCE_MANIFESTS=str(config.root / "infra" / "knative"),
            PINGSOURCE_SERVICES=str(config.path("services.json")),
        )
        log("starting pingsource (the manifests' PingSources, straight to their sinks)")
        pingsource = [sys.executable, "-m", "events.pinger"]
        self._start("pingsource", pingsource, pingsource_env, config.root)

        # Knative Eventing's JobSink: the long fits' Jobs, as processes (events/jobsink.py)
        sinks = job_sinks(config.root / "infra" / "knative")
        if sinks:
            jobsink_env = self._process_env(
                env_for_clients,
                **_SINGLE_THREADED,
                JOBSINK_HOST=HOST,
                JOBSINK_PORT=str(ports["jobsink"]),
                JOBSINK_MANIFESTS=str(config.root / "infra" / "knative"),
                JOBSINK_STATE_DIR=str(config.path("jobsink")),
                JOBSINK_PARALLELISM=str(config.train_workers),
                JOBSINK_ROOT=str(config.root),
            )
            log(f"starting jobsink    ({env_for_clients['JOBSINK_URL']})")
            jobsink = [sys.executable, "-m", "events.jobsink"]
            self._start("jobsink", jobsink, jobsink_env, config.root)
        # the train Service hands long fits to the (only) JobSink
        handoff_url = (
            f"{env_for_clients['JOBSINK_URL']}/{'/'.join(next(iter(sinks)))}"
            if len(sinks) == 1
            else ""
        )

        for spec in config.present_functions():
            names = (
                [f"train-{i}" for i in range(1, config.train_workers + 1)]
                if spec.service == "train"
                else [spec.service]
            )
            for name in names:
                extra: dict[str, str] = {"K_SINK": env_for_clients["BROKER_URL"]}
                if spec.service == "events-adapter":
                    extra["ADAPTER_TOKEN"] = credentials.webhook_token
                if spec.service == "train":
                    extra |= {**_SINGLE_THREADED, "THREADS": "2", "TRAIN_REPLICA": name}
                    extra |= {"TRAIN_JOBSINK_URL": handoff_url} if handoff_url else {}
                elif spec.service == "aggregate":
                    extra |= {"THREADS": "2"}
                elif spec.service == "predict":
                    extra |= PREDICT_SERVER_ENV
                elif spec.service == "events-adapter":
                    # Every function's worker (readmission.glue.slow_clients) closes each
                    # connection after its answer. With gunicorn 26's own threaded worker, the
                    # SeaweedFS webhook client kept a connection open, and that worker, stopping,
                    # waited in one select for the whole 30 s graceful timeout to drop it.
                    extra |= {"THREADS": "1"}
                else:
                    extra |= {"THREADS": "4"}
                cmd = [
                    _tool("functions-framework"),
                    f"--source={config.root / spec.source}",
                    f"--target={spec.target}",
                    f"--signature-type={spec.signature}",
                    f"--host={HOST}",
                    f"--port={ports[name]}",
                ]
                log(f"starting {name:<13}(http://{HOST}:{ports[name]})")
                self._start(name, cmd, self._process_env(env_for_clients, **extra), config.root)

        mlflow_cmd = [
            _tool("mlflow"),
            "server",
            f"--backend-store-uri=sqlite:///{config.path('mlflow.db')}",
            f"--artifacts-destination=s3://{settings_for(env_for_clients).buckets.mlflow}",
            "--serve-artifacts",
            f"--host={HOST}",
            f"--port={ports['mlflow']}",
            f"--workers={config.mlflow_workers}",
            # gunicorn serves MLflow's Flask app as it is; uvicorn (the default) wraps it in
            # FastAPI through a WSGI bridge, which costs more server CPU per training run,
            # whatever MLflow's FutureWarning says.
            "--gunicorn-opts=--threads=4 --log-level=warning",
        ]
        log(f"starting mlflow     ({env_for_clients['MLFLOW_TRACKING_URI']})")
        # The job-execution workers (huey, several processes and GB of memory) serve MLflow
        # features this pipeline does not use.
        mlflow_env = {**base_env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self._start("mlflow", mlflow_cmd, mlflow_env, config.state_dir)

        checks: dict[str, Callable[[], bool]] = {
            **self._start_prometheus(ports, base_env, log),
            "mlflow": lambda: (
                processes.http_status(f"http://{HOST}:{ports['mlflow']}/health") == 200
            ),
            "broker": lambda: (
                processes.http_status(f"http://{HOST}:{ports['broker']}/healthz") == 200
            ),
        }
        if sinks:
            checks["jobsink"] = lambda: (
                processes.http_status(f"{env_for_clients['JOBSINK_URL']}/healthz") == 200
            )
        for name in config.process_names():  # functions-framework has no health route: any answer
            url = f"http://{HOST}:{ports[name]}/"
            checks[name] = lambda url=url: processes.http_status(url) is not None
        return checks

    def _start_prometheus(
        self, ports: dict[str, int], env: dict[str, str], log: Callable[[str], None]
    ) -> dict[str, Callable[[], bool]]:
        """Prometheus scraping every function that serves /metrics (only predict does), with
        the manifests' alert rules; absent when not installed (the stack runs without it)."""
        config = self.config
        executable = prometheus.binary() if config.prometheus else None
        if executable is None or "prometheus" not in ports:
            if config.prometheus:
                log(f"prometheus not installed: no local alerts ({prometheus.INSTALL_HINT})")
            return {}
        directory = config.path("prometheus")
        targets = {name: [f"{HOST}:{ports[name]}"] for name in METRICS_FUNCTIONS if name in ports}
        prometheus.write_config(
            directory,
            config.root,
            targets,
            config.prometheus_scrape_seconds,
            config.prometheus_rule_for or None,
        )
        url = f"http://{HOST}:{ports['prometheus']}"
        log(f"starting prometheus ({url}; scrapes {', '.join(sorted(targets)) or 'nothing'})")
        command = prometheus.command(executable, directory, HOST, ports["prometheus"])
        self._start("prometheus", command, env, directory)
        return {"prometheus": lambda: processes.http_status(f"{url}/-/ready") == 200}

    def _wait_ready(
        self, checks: dict[str, Callable[[], bool]], deadline: float, log: Callable[[str], None]
    ) -> list[str]:
        """Wait for every check (named after its process, if any); returns the pipeline
        functions that exited while starting."""
        pending = dict(checks)
        recorded = {p.name: p for p in processes.recorded(self.run_dir)}
        failed: list[str] = []
        while pending:
            for name, check in list(pending.items()):
                if check():
                    log(f"ready: {name}")
                    del pending[name]
                elif name in recorded and not processes.is_running(recorded[name]):
                    if name in CORE_PROCESSES or self.config.strict:
                        raise StackError(f"{name} exited:\n{self.tail(name, 30)}")
                    log(f"WARNING: {name} exited at start; its events will be dead-lettered:")
                    log(self.tail(name, 8))
                    failed.append(name)
                    del pending[name]
            if pending and time.monotonic() > deadline:
                raise StackError(
                    f"not ready after {self.config.start_timeout:.0f}s: {sorted(pending)}"
                )
            if pending:
                time.sleep(0.5)
        return failed

    def _s3_ready(self, env_for_clients: dict[str, str]) -> bool:
        try:
            store_for(env_for_clients).client.list_buckets()
        except Exception:  # not up yet: any S3 or connection error means "try again"
            return False
        return True

    def _buckets_ready(self, env_for_clients: dict[str, str]) -> bool:
        try:
            store = store_for(env_for_clients)
            store.ensure_buckets(settings_for(env_for_clients).buckets.all())
        except Exception:  # not up yet: any S3 or connection error means "try again"
            return False
        return True

    # down / status ---------------------------------------------------------------------------
    def down(self, log: Callable[[str], None] = print) -> list[str]:
        recorded = processes.recorded(self.run_dir)
        stopped = processes.stop_all(recorded, self.run_dir, stages=STOP_STAGES)
        for process in recorded:
            if process.name in stopped:
                log(f"stopped {process.name} (pid {process.pid})")
        return stopped

    def tail(self, name: str, lines: int = 40) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
