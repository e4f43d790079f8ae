"""Start (or join) Ray, deploy the app, wait until it is ready, and tear down what we started."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil
import ray
from ray import serve

from raylm import _ray, errors
from raylm.errors import CONFIG_ERROR
from raylm.config import AppConfig
from raylm.contract import APP_NAME, deployment_name
from raylm.serve import status
from raylm.serve.control import capacity
from raylm.serve.control.builder import build_app
from raylm.serve.replica import warm

logger = logging.getLogger("raylm.serve")


@dataclass
class Service:
    """A running raylm app; `stop()` removes everything this process started, and nothing else."""

    config: AppConfig
    started_ray: bool
    started_serve: bool
    url: str
    choices: dict[str, list[str]] = field(default_factory=dict)  # per model: dtype, threads (hardware.py)

    @property
    def log_dir(self) -> str:
        """Where every Ray process of this session writes its output (replicas, engines, Serve)."""
        return _ray.session_log_dir()

    @property
    def metrics_url(self) -> str:
        """This node's Prometheus endpoint (Ray's metrics export)."""
        node_id = ray.get_runtime_context().get_node_id()
        node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
        return f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"

    def apply(self, config: AppConfig, report: Callable[[str], None] = logger.warning) -> float:
        """Deploy an edited config in place: Serve replaces the deployments in rolling fashion, each leaving
        replica finishing its requests for serve.drain_s and its streams then resumed elsewhere (docs/
        serve.md). Returns the seconds until every deployment ran the new config only. Raises ValueError
        for a change that needs a restart, DeployError if Serve refuses it, TimeoutError after
        serve.ready_timeout_s."""
        fixed = [k for k in RESTART_ONLY if getattr(config.serve, k) != getattr(self.config.serve, k)]
        if fixed:
            raise ValueError(f"serve.{', serve.'.join(fixed)} changed: restart raylm serve to apply that")
        began = time.monotonic()
        check_capacity(config, strict=self.started_ray, report=report)
        try:
            serve.run_many([serve.RunTarget(build_app(config), name=APP_NAME, route_prefix=None)],
                           wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
        except RuntimeError as exc:
            raise DeployError(f"{exc}\n{_describe_deployments()}") from None
        self.config = config
        while not _rolled_out():
            if time.monotonic() - began > config.serve.ready_timeout_s:
                raise TimeoutError(f"the new config was not running after {config.serve.ready_timeout_s:.0f}s:\n"
                                   f"{_describe_deployments()}")
            time.sleep(0.5)
        if self.started_ray:  # the warm workers of the old config go, the new one's come
            warm.settle(config.models)
        return time.monotonic() - began

    def stop(self) -> None:
        with _without_lines(sys, "stdout", _SERVE_SHUTDOWN_NOISE):
            self._stop()

    def _stop(self) -> None:
        # Our descendants (GCS, raylet, its agents, workers, EngineCores) are listed before Ray goes
        # down, so that whatever outlives ray.shutdown() can be ended by PID afterwards.
        ours = psutil.Process().children(recursive=True) if self.started_ray else []
        try:
            if self.started_serve:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)  # Serve was there before us: take away only our app
            if not self.started_ray:  # and the warm workers this node keeps for our models
                warm.end(self.config.models)
        finally:
            if self.started_ray:
                try:
                    ray.shutdown()
                finally:  # Ray's agents outlive ray.shutdown() and ignore SIGTERM for a while: not long
                    end_processes(ours, grace_s=2.0, term_s=3.0)


# Serve's controller ends itself in serve.shutdown() while the driver's calls to it (that very call, Serve's
# long poll) are pending: Ray's error listener in the driver then prints "(raylet) Task
# ServeController.graceful_shutdown failed. There are infinite retries remaining, ..." to stdout, whatever
# log_to_driver says (ray._private.worker.listen_error_messages). Nothing to tell a user who stopped raylm.
_SERVE_SHUTDOWN_NOISE = ("Task ServeController.",)


@contextlib.contextmanager
def _without_lines(owner: Any, name: str, markers: tuple[str, ...]) -> Iterator[None]:
    """`owner.name` (a text stream: sys.stdout) without the lines that hold one of `markers`, until the end."""
    stream, lock, pending = getattr(owner, name), threading.Lock(), [""]

    class Filtered:
        def write(self, text: str) -> int:
            with lock:  # Ray's listener thread writes too
                *lines, pending[0] = (pending[0] + text).split("\n")
                for line in lines:
                    if not any(m in line for m in markers):
                        stream.write(line + "\n")
            return len(text)

        def __getattr__(self, attribute: str) -> Any:
            return getattr(stream, attribute)

    setattr(owner, name, Filtered())
    try:
        yield
    finally:
        setattr(owner, name, stream)
        if pending[0] and not any(m in pending[0] for m in markers):
            stream.write(pending[0])


# What `Service.apply` cannot change in a running service: the address it serves and the cluster it is on.
RESTART_ONLY = ("host", "port", "address", "metrics_port", "num_cpus")


def _rolled_out() -> bool:
    """Every deployment of the app at its target, each replica running (none starting or leaving)."""
    app = _ray.serve_app(APP_NAME)
    if app is None or app.status != "RUNNING":
        return False
    return all(set(d.replica_states) <= {"RUNNING"} and d.status == "HEALTHY" for d in app.deployments.values())


def end_processes(processes: list[psutil.Process], grace_s: float = 10.0, term_s: float = 5.0) -> None:
    """Give processes `grace_s` to exit, then SIGTERM, then (after `term_s`) SIGKILL: only these."""
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(alive, timeout=term_s)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()


# Ray Serve's throughput-optimized mode for the Ray cluster raylm starts: user code and router on each
# replica's main event loop, garbage collector frozen after start; handles made inside replicas (the
# ingress's) use Serve's gRPC transport. Serve's HTTP proxy is not started: the ingress replicas serve HTTP
# themselves (ingress.py), so it would only hold memory. Request logs are written at once (buffered, a
# killed replica's last 1,000 lines were lost).
# Serve's controller runs its loop every 0.5 s, not 0.1 s, and workers' output is not copied to the
# console (`log_to_driver`, unless `verbose`; it stays in the session's log files): on 2 cores, with the
# engine's OpenMP threads on both, that background stalled the engine. SmolLM2 at c=16, two rounds: 168 →
# 190 tok/s, TTFT p50 at c=1 147 → 124 ms.
# Metrics are reported every 2 s, not Ray's 10 s: Ray's agent replays every histogram observation one by
# one (open_telemetry_metric_recorder.py), so under a 1,900 tok/s flood on 2 cores each 10 s report was a
# 270 ms burst of a core, stalling first tokens by 100-200 ms. Most of it was vLLM's inter-token histogram,
# one observation per token, which raylm no longer exports (engine/vllm.py, ray_stat_logger); before that,
# 2 s still left 30-70 ms bursts (the fairness test's light-tenant tail) and 0.5 s was used. Each report
# also costs the agent ~20 ms at idle: at 0.5 s, 1.43 s of CPU per 30 s idle, at 2 s 0.98 s.
# Ray's log monitor lists the log folder every 0.1 s while it holds under 1,000 files; with the threshold at
# 0 it does so every 0.5 s (LOG_NAME_UPDATE_INTERVAL_S): 0.62 → 0.34 s of CPU per 30 s idle. It only finds
# new workers' files for `-v`'s console copy, which then starts up to 0.5 s later.
# Workers stay at Ray's nice 15. Tried at nice 0 (as raylm data's stage actors): benchmarks/dataplane.py, one
# round, tiny Llama with the engine on core 1, c=64: 1,129 tok/s against 1,501 at nice 15 (0.75×), serving
# path 0.756 against 0.549 ms of CPU per token.
# Each replica's engine processes run 4 levels lower still (19: _ray.renice_engine): dataplane.py --layout
# default, tiny Llama on both cores, two rounds: c=64 1,167 and 1,444 tok/s against 813 and 916 with the engine
# at its replica's 15, 7 and 0 requests refused (429) against 765 and 421; c=16 876 and 1,012 against 822 and 755.
# A joined cluster keeps its own settings. The user's values win.
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
             "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1", "RAY_metrics_report_interval_ms": "2000",
             "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
             "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
             # A replica's worker imports torch and vLLM in its setup hook (serve/replica/warm.py) before its
             # actor starts, which Serve counts as scheduling: ~20 s alone on 2 cores, over 30 s (Serve's
             # default, then "waiting for the cluster to auto-scale") beside other starts, up to ~60 s on a
             # loaded machine (a full test run's).
             "RAY_SERVE_SLOW_STARTUP_WARNING_S": "120"}


def connect_ray(config: AppConfig, verbose: bool = False) -> bool:
    """Join the configured cluster, or start a local one on loopback. Returns True if we started it.
    `verbose` copies every Ray worker's output (replicas, engines) to this console."""
    if ray.is_initialized():
        return False
    if config.serve.address is not None:
        _ray.use_local_auth_token()
        ray.init(address=config.serve.address, logging_level=logging.WARNING, log_to_driver=verbose)
        _reassert_signal_handlers()
        return False
    for key, value in SERVE_ENV.items():  # read by Serve's processes, which inherit this env
        os.environ.setdefault(key, value)
    _ray.init_local(config.serve.num_cpus, config.serve.metrics_port, _ray.LOCAL_RAY_CONFIG, verbose)
    _reassert_signal_handlers()
    _ray.renice_agents()  # their metrics bursts below the serving path, not above it
    return True


def _reassert_signal_handlers() -> None:
    """Ray's core worker puts a C-level SIGTERM handler in place that logs a stack and kills the process at
    once: no `finally` ran, and Ray's dashboard and runtime-env agents outlived `raylm serve` (seen: still up
    20 s after it exited). The Python handlers set before (run_forever's) are put back."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        handler = signal.getsignal(sig)
        if callable(handler):
            signal.signal(sig, handler)


def start(config: AppConfig, verbose: bool = False, report: Callable[[str], None] = logger.warning,
          progress: Callable[[str], None] = logger.info) -> Service:
    """Deploy and block until every model is ready (or raise after `serve.ready_timeout_s`); `report`
    gets what Serve says about replicas that are slow to start, `progress` each model's phase as it
    changes (pending → starting → loading weights → ready), with the seconds since the start."""
    began = time.monotonic()
    started = connect_ray(config, verbose)
    progress(f"{time.monotonic() - began:5.1f}s  Ray " + ("started (local)" if started else "joined"))
    host, port = config.serve.host, config.serve.port
    url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
    service = Service(config, started, started or not _ray.serve_controller_running(), url)
    try:
        check_capacity(config, strict=started, report=report)
        if started:  # one node, this one: the replicas' imports start now, beside Serve's own start
            warm.prestart_for(config.models, {m.name: capacity.replicas_at_start(m) for m in config.models})
        serve.start(proxy_location="Disabled")  # the ingress serves HTTP itself
        # Not waiting here: wait_ready follows each model's phase while it starts, and raises with Serve's
        # reasons when a deployment fails.
        try:
            serve.run_many([serve.RunTarget(build_app(config), name=APP_NAME, route_prefix=None)],
                           wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
        except RuntimeError as exc:
            raise DeployError(f"{exc}\n{_describe_deployments()}") from None
        phases = _Phases({m.name: deployment_name(m.name) for m in config.models}, began, progress)
        wait_ready(service.url, config.serve.ready_timeout_s, report, phases)
        if started:
            warm.settle(config.models)
        service.choices = engine_choices(config)
    except BaseException:
        service.stop()
        raise
    return service


def check_capacity(config: AppConfig, strict: bool, report: Callable[[str], None]) -> None:
    """Refuse a config the cluster cannot hold (strict: a cluster raylm started, which will not grow);
    on a joined cluster, which may autoscale, only say so."""
    from raylm.models import resolve_source

    def weights(model) -> int:
        try:
            return capacity.weights_bytes(resolve_source(model.source, config.serve.cache_dir))
        except (OSError, ValueError):
            return 0

    need = capacity.demand(config, weights)
    for model in (m for m in config.models if m.num_gpus):  # their memory arithmetic, where the files are here
        try:
            plan = capacity.gpu_plan(model, resolve_source(model.source, config.serve.cache_dir), weights(model))
        except (OSError, ValueError, KeyError):
            plan = None
        if plan:
            report(plan)
    free = psutil.virtual_memory().available if strict else None
    problems = capacity.shortfalls(need, ray.cluster_resources(), free)
    if problems and strict:
        raise DeployError("\n".join(problems))
    if problems:
        report("; ".join(problems) + " (waiting: the cluster may grow)")


def engine_choices(config: AppConfig) -> dict[str, list[str]]:
    """What one replica of each running model picked for its machine."""
    choices = {}
    for model in config.models:
        if model.autoscaling is not None and model.autoscaling.min_replicas == 0:
            continue
        try:
            handle = serve.get_deployment_handle(deployment_name(model.name), APP_NAME)
            choices[model.name] = handle.describe.remote().result(timeout_s=10)
        except Exception as exc:  # informational only
            logger.debug("no engine choices from %s: %r", model.name, exc)
    return choices


class DeployError(RuntimeError):
    """The app could not be deployed; the message carries each failing deployment's reason."""


_SLOW_INIT = "to initialize"  # Serve's "replicas that have taken more than 30s to initialize"


def _deployment_messages(app: Any = None) -> dict[str, str]:
    """What Serve says about each deployment of raylm's app that has something to say."""
    if app is None:
        try:
            app = _ray.serve_app(APP_NAME)
        except Exception:  # Serve itself is unreachable: nothing more to say
            return {}
    if app is None:  # no app (yet, or any more)
        return {}
    return {name: d.message for name, d in app.deployments.items() if d.message}


def _headline(message: str) -> str:
    """Serve's message about a replica that failed to start carries the whole traceback (Ray's, Serve's and
    the constructor's, ~40 lines): its first line and the exception it ended with say it."""
    ended = errors.exception_lines(message)
    if "Traceback" not in message or not ended:
        return message
    return f"{message.splitlines()[0].strip()} … {ended[-1]}"


def _describe_deployments() -> str:
    return "\n".join(f"{name}: {_headline(message)}" for name, message in _deployment_messages().items())


class _Phases:
    """Each model's start-up phase, said once when it changes: pending (no replica placed yet), starting
    (a replica process importing), loading weights (the replica's own report), ready."""

    def __init__(self, deployments: dict[str, str], began: float, say: Callable[[str], None]) -> None:
        self.deployments, self.began, self.say = deployments, began, say
        self.last: dict[str, str] = {}

    def update(self, app) -> None:
        reported = status.reports(max_age_s=None)
        for name, deployment in self.deployments.items():
            d = app.deployments.get(deployment) if app is not None else None
            states = status.replica_counts(d)
            phases = {r.get("phase") for r in reported.get(name, [])}
            # A replica reports "ready" a moment before Serve counts it as running: still loading till then.
            phase = ("ready" if states.get("RUNNING") else "loading weights" if phases & {"loading weights", "ready"}
                     else "starting" if states.get("STARTING") else "pending")
            self._say(name, phase)

    def loading(self, deployment: str) -> bool:
        """Whether that deployment's model is known to be loading (so "slow to initialize" is no news)."""
        return any(self.last.get(n) == "loading weights" for n, d in self.deployments.items() if d == deployment)

    def done(self) -> None:
        for name in self.deployments:
            self._say(name, "ready")

    def _say(self, name: str, phase: str) -> None:
        if self.last.get(name) != phase:
            self.last[name] = phase
            self.say(f"{time.monotonic() - self.began:5.1f}s  {name}: {phase}")


def wait_ready(url: str, timeout_s: float, report: Callable[[str], None] = logger.warning,
               phases: _Phases | None = None) -> None:
    """Until /ready answers 200; each new thing Serve says about a deployment (a replica it cannot place,
    a runtime env being built, a constructor that failed) goes to `report` as it appears."""
    deadline = time.monotonic() + timeout_s
    last, said = "no answer", set()
    while time.monotonic() < deadline:
        status = _ray.serve_app(APP_NAME)
        if phases is not None:
            with contextlib.suppress(Exception):  # the live status is informational
                phases.update(status)
        if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise DeployError(f"deployment failed: {_headline(status.message or status.status)}\n"
                              f"{_describe_deployments()}")
        for name, message in _deployment_messages(status).items():
            if CONFIG_ERROR in message:  # a replica will never start with this config: no point retrying it
                raise DeployError(f"{name}: {message[message.index(CONFIG_ERROR):].splitlines()[0]}")
            line = f"{name}: {_headline(message)}"
            if line not in said and not (phases is not None and phases.loading(name) and _SLOW_INIT in message):
                said.add(line)
                report(line)
        if status is not None and status.status != "RUNNING":
            # /ready waits up to READY_TIMEOUT_S on a model still starting: probing it then would blind the
            # phases above for seconds, longer than a forked engine takes to load (its phase went unsaid).
            time.sleep(0.5)
            continue
        try:
            r = httpx.get(f"{url}/ready", timeout=10)
            if r.status_code == 200:
                if phases is not None:
                    phases.done()
                return
            last = r.text
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise TimeoutError(f"raylm was not ready after {timeout_s:.0f}s: {last}")


def run_forever(config: AppConfig, on_ready=print, verbose: bool = False,
                report: Callable[[str], None] = logger.warning, progress: Callable[[str], None] = logger.info,
                on_reload: Callable[[Service], None] | None = None) -> None:
    """Serve until Ctrl-C or SIGTERM, then stop cleanly (also when interrupted while starting). SIGHUP calls
    `on_reload(service)` (the CLI reads its config file again and applies it: Service.apply)."""
    # Explicit handlers: a process started in the background inherits SIGINT ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    reload = threading.Event()
    signal.signal(signal.SIGHUP, lambda *_: reload.set())
    service = start(config, verbose, report, progress)
    signal.signal(signal.SIGINT, _interrupt)  # ours again: ray.init put Ray's in place (sys.exit(15))
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        on_ready(service)
        while True:
            if reload.wait(3600) and on_reload is not None:
                reload.clear()
                on_reload(service)
    except KeyboardInterrupt:
        pass
    finally:
        # Shutdown must finish: further Ctrl-C would leave half-stopped processes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        service.stop()


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt
