"""The online service: Ray Serve deployments hosting vLLM engines behind OpenAI routes.

    edge/      the request path at the front: the HTTP server and its limits, auth and tenants, the OpenAI
               routes, the ingress deployment (forward, retry, relay), the prefix router, the playground
    replica/   one deployment per model: admission (fair queue, 429) in front of the engine
    batch/     the OpenAI Batch API: its routes, its files on disk, the deployment that runs batches
    control/   the control plane: config → Serve application, start/stop a service, capacity checks
    stream.py  a stream's bytes from a replica to the ingress over a direct connection (both ends)
    status.py, metrics.py   what every part reports: /status and Prometheus

Every value crossing between the parts is defined in `raylm.contract`.
"""

from raylm.contract import APP_NAME
from raylm.serve.control.builder import build_app

__all__ = ["APP_NAME", "build_app"]
