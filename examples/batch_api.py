"""The OpenAI Batch API against a running `raylm serve` (make serve), with the unmodified OpenAI SDK.

    .venv/bin/python examples/batch_api.py [--url http://127.0.0.1:8000/v1] [--lines 20]

Uploads a JSONL of chat requests (one of them malformed), creates a batch, polls it and prints the answers.
"""

import argparse
import json
import time

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--lines", type=int, default=20)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    args = parser.parse_args()
    client = OpenAI(base_url=args.url, api_key="unused")  # or your key when serve.api_keys is set
    questions = [f"What is {i} + {i}? Answer with the number only." for i in range(args.lines)]
    lines = [json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": args.model, "max_tokens": 16,
                                  "messages": [{"role": "user", "content": q}]}}) for i, q in enumerate(questions)]
    lines.append("{a malformed line")
    upload = client.files.create(file=("questions.jsonl", "\n".join(lines).encode()), purpose="batch")
    print(">>> client.files.create(...) ->", upload.model_dump_json())
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    print(">>> client.batches.create(...) ->", batch.model_dump_json())
    start, status = time.monotonic(), None
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(0.5)
        batch = client.batches.retrieve(batch.id)
        if batch.status != status:
            status = batch.status
            print(f"[{time.monotonic() - start:5.1f}s] client.batches.retrieve -> {batch.status} {batch.request_counts}")
    print(">>> client.batches.retrieve(...) ->", batch.model_dump_json())
    output = client.files.content(batch.output_file_id).text.splitlines()
    print(f">>> client.files.content(output_file_id): {len(output)} lines, the first:\n{output[0]}")
    for line in output[:5]:
        answer = json.loads(line)
        print(answer["custom_id"], "->", answer["response"]["body"]["choices"][0]["message"]["content"])
    if batch.error_file_id:
        print(">>> client.files.content(error_file_id):\n" + client.files.content(batch.error_file_id).text)


if __name__ == "__main__":
    main()
