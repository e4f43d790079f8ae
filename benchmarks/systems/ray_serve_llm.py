"""Ray Serve LLM (`ray.serve.llm.build_openai_app`) on the CPU: the peer raylm is compared with.

    python benchmarks/systems/ray_serve_llm.py MODEL_DIR NAME PORT [--replicas N]

Best settings found on 2 cores: the engine's OpenMP threads bound to every core, the ingress at 0.1 CPU,
each replica's placement group bundle at 1 CPU (Ray started with 2 per replica + 1). With
RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1 (and Serve's HAProxy) the model server is itself the ingress, so
there is no ingress deployment to configure.
Prints the OpenAI base URL once the app answers; Ctrl-C/SIGTERM stops it.
"""

import json
import os

from launch import arg_parser, serve_until_stopped

if __name__ == "__main__":
    parser = arg_parser()
    parser.add_argument("--engine-args", default="{}")
    parser.add_argument("--env", default="{}")
    parser.add_argument("--lora-config", default="", help="its LoraConfig as JSON (dynamic_lora_loading_path: "
                                                          "an s3:// folder of adapters; requests name NAME:adapter)")
    args = parser.parse_args()

    from ray.serve.llm import LLMConfig, build_openai_app

    def build():
        config = LLMConfig(
            model_loading_config={"model_id": args.name, "model_source": args.model_dir},
            engine_kwargs=json.loads(args.engine_args),
            placement_group_config={"bundles": [{"CPU": 1}]},
            deployment_config={"num_replicas": args.replicas, "ray_actor_options": {"num_cpus": 0.5}},
            runtime_env={"env_vars": json.loads(args.env)},
            **({"lora_config": json.loads(args.lora_config)} if args.lora_config else {}),
        )
        direct = os.environ.get("RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING") == "1"
        ingress = {} if direct else {"ingress_deployment_config": {"ray_actor_options": {"num_cpus": 0.1}}}
        return build_openai_app({"llm_configs": [config], **ingress})

    serve_until_stopped(args.port, 2 * args.replicas + 1, build)
