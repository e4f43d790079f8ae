"""The seed's naive deployment, ported to current Serve: a transformers `pipeline("text-generation")` run
per request inside a Serve replica, with no batching and no engine.

    python benchmarks/systems/naive_pipeline.py MODEL_DIR NAME PORT [--replicas N]

It answers /v1/completions (and /v1/models) in the OpenAI shape; with `stream` the whole text arrives as one
chunk at the end, which is when a pipeline has it. Prints the base URL when ready.
"""

from launch import arg_parser, serve_until_stopped

if __name__ == "__main__":
    args = arg_parser().parse_args()

    import json

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, StreamingResponse
    from ray import serve

    api = FastAPI()

    @serve.deployment(num_replicas=args.replicas, ray_actor_options={"num_cpus": 0.5})
    @serve.ingress(api)
    class NaiveLLM:
        def __init__(self, model_dir: str, name: str) -> None:
            from transformers import pipeline

            self.pipe = pipeline("text-generation", model=model_dir)
            self.name = name

        @api.get("/v1/models")
        def models(self):
            return {"object": "list", "data": [{"id": self.name, "object": "model"}]}

        @api.post("/v1/completions")
        def completions(self, body: dict):
            n = int(body.get("max_tokens", 16))
            prompt_ids = self.pipe.tokenizer(body["prompt"])["input_ids"]
            out = self.pipe(body["prompt"], max_new_tokens=n, min_new_tokens=n if body.get("ignore_eos") else None,
                            do_sample=False, return_full_text=False)[0]["generated_text"]
            usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": n, "total_tokens": len(prompt_ids) + n}
            choice = {"index": 0, "text": out, "finish_reason": "length"}
            if not body.get("stream"):
                return JSONResponse({"object": "text_completion", "model": self.name, "choices": [choice],
                                     "usage": usage})
            chunks = [{"object": "text_completion", "model": self.name, "choices": [choice]},
                      {"object": "text_completion", "model": self.name, "choices": [], "usage": usage}]
            return StreamingResponse(iter([f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]),
                                     media_type="text/event-stream")

    serve_until_stopped(args.port, 2, lambda: NaiveLLM.bind(args.model_dir, args.name))
