"""The serving path's shape: streams leave the replica on a loopback socket; one engine process per replica,
its OpenMP threads fitted to the machine; concurrent streams over shared keep-alive connections all finish."""

import asyncio

import httpx
import psutil
from helpers import AUTH, replica_processes
from ray import serve

from raylm import hardware
from raylm.bench.load import closed_loop, completion_body, send
from raylm.contract import APP_NAME


def _replica(model: str) -> psutil.Process:
    return replica_processes(model)[0]


def _listening(proc: psutil.Process) -> set[tuple[str, int]]:
    return {(c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}


def test_the_serving_path_listens_on_loopback_only(service):
    """On a cluster raylm starts, the stream hub binds the node's address, 127.0.0.1; the API binds serve.host."""
    stats = serve.get_deployment_handle("model-tiny", APP_NAME).stats.remote().result()
    host, port = stats["streams"].rsplit(":", 1)
    assert host == "127.0.0.1" and ("127.0.0.1", int(port)) in _listening(_replica("tiny"))
    ingress = next(p for p in psutil.Process().children(recursive=True)
                   if any(f"ServeReplica:{APP_NAME}:ingress" in a for a in p.cmdline()))
    assert ("127.0.0.1", int(service.url.rsplit(":", 1)[1])) in _listening(ingress)


def test_the_worker_runs_inside_enginecore_with_a_thread_per_bound_core(service):
    replica = _replica("tiny")
    children = [" ".join(p.cmdline()) + p.name() for p in replica.children(recursive=True)]
    assert sum("EngineCore" in c for c in children) == 1
    assert not any("Worker" in c for c in children), children
    engine = next(p for p in replica.children(recursive=True) if "EngineCore" in " ".join(p.cmdline()) + p.name())
    # Forked from the replica's forkserver (started with Ray's OMP_NUM_THREADS=1, which its first environment
    # keeps showing), it takes the replica's environment and one OpenMP thread per bound core itself (CPU_ENV
    # binds cores 0-1; Ray's 1 would halve it): tests/unit/test_engine_args.py checks both in such a child.
    assert "multiprocessing.forkserver" in " ".join(engine.parent().cmdline())
    assert sorted(engine.cpu_affinity()) == [0, 1]


def test_each_replica_says_what_it_fitted_to_the_machine(service):
    notes = serve.get_deployment_handle("model-smollm2-135m-instruct", APP_NAME).describe.remote().result()
    assert any(n.startswith("dtype ") for n in notes) and any("OpenMP" in n for n in notes)
    # The tests' config sets the threads, not the dtype: raylm picks it from this CPU's flags.
    picked = hardware.fit({}, {}).engine_args["dtype"]
    assert service.choices["tiny"][0].startswith(f"dtype {picked} (CPU flags")
    assert "set in the config" in service.choices["tiny"][1]


def test_concurrent_streams_on_keepalive_connections_have_no_tail(service):
    """guidellm at c=16 once saw 4 of 32 requests take 104-201 s while the rest took under 8 s (BENCHMARKS.md,
    through Serve's HTTP proxy, before issue 11). Its pattern: 16 streams at once from one client whose
    connections are reused. Every request must finish, none far behind the others."""
    async def run():
        async with httpx.AsyncClient(timeout=120, headers=AUTH, limits=httpx.Limits(max_keepalive_connections=20)) as client:
            return await closed_loop(lambda i: send(client, f"{service.url}/v1/completions",
                                                    completion_body("tiny", f"request {i}", 64)), 16, 48, 120)

    result = asyncio.run(run())
    latencies = sorted(r.latency_s for r in result.results)
    assert len(result.results) == 48 and all(r.ok and r.output_tokens == 64 for r in result.results)
    assert latencies[-1] <= 3 * latencies[len(latencies) // 2] + 1.0, latencies[-5:]
