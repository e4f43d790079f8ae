"""What every peer launcher shares: its arguments, a local Ray on loopback, Serve, and a clean stop."""

import argparse
import os
import signal
import time
from collections.abc import Callable


def arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("name")
    parser.add_argument("port", type=int)
    parser.add_argument("--replicas", type=int, default=1)
    return parser


def serve_until_stopped(port: int, num_cpus: int, build_app: Callable) -> None:
    """Start Ray and Serve on 127.0.0.1, run `build_app()` (called after ray.init: Ray Serve LLM's app
    needs the cluster), print the base URL, and serve until SIGTERM or Ctrl-C; then stop and exit."""
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(), blocking=False)
    print(f"http://127.0.0.1:{port}/v1", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    try:
        while not stop:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    serve.shutdown()
    ray.shutdown()
    os._exit(0)
