"""Ray Serve LLM (`ray.serve.llm.build_openai_app`) on the CPU: the peer raylm is compared with.

    python benchmarks/systems/ray_serve_llm.py MODEL_DIR NAME PORT [--replicas N]

Best settings found on 2 cores: the engine's OpenMP threads bound to every core, the ingress at 0.1 CPU,
each replica's placement group bundle at 1 CPU (Ray started with 2 per replica + 1).
Prints the OpenAI base URL once the app answers; Ctrl-C/SIGTERM stops it.
"""

import argparse
import json
import os
import signal
import time

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("name")
    parser.add_argument("port", type=int)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--engine-args", default="{}")
    parser.add_argument("--env", default="{}")
    args = parser.parse_args()

    import ray
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    ray.init(address="local", num_cpus=2 * args.replicas + 1, include_dashboard=False, _node_ip_address="127.0.0.1")
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    config = LLMConfig(
        model_loading_config={"model_id": args.name, "model_source": args.model_dir},
        engine_kwargs=json.loads(args.engine_args),
        placement_group_config={"bundles": [{"CPU": 1}]},
        deployment_config={"num_replicas": args.replicas, "ray_actor_options": {"num_cpus": 0.5}},
        runtime_env={"env_vars": json.loads(args.env)},
    )
    app = build_openai_app({"llm_configs": [config],
                            "ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0.1}}})
    serve.run(app, blocking=False)
    print(f"http://127.0.0.1:{args.port}/v1", flush=True)
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
