"""Tool calling as a new user tries it, with the unmodified OpenAI SDK, against the bundled SmolLM2 (its config:
`tool_call_parser: hermes`, arguments forced to the tool's schema). Its chat template does not show the model
the tools: every valid call below is vLLM's structured output at work, which is the point. Reasoning: the tiny
model with Granite's parser, made to write Granite's markers by structured output."""

import json

import httpx
import jsonschema
import openai
import pytest
from helpers import AUTH, THINKING

SMOLLM2 = "smollm2-135m-instruct"
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {
               "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
               "required": ["city", "unit"], "additionalProperties": False}}
TIME = {"name": "get_time", "description": "The local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMAS = {f["name"]: f["parameters"] for f in (WEATHER, TIME)}


def valid_call(name: str, arguments: str | dict) -> dict:
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(args, SCHEMAS[name])
    return args


def streamed_calls(stream) -> dict[int, dict]:
    calls: dict[int, dict] = {}
    for chunk in stream:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = call["id"] or delta.id
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
    return calls


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_a_forced_tool_call_is_valid_and_streams_the_same(client, choice):
    answer = client.chat.completions.create(model=SMOLLM2, messages=ASK, tools=TOOLS, tool_choice=choice,
                                            max_tokens=100)
    message = answer.choices[0].message
    (call,) = message.tool_calls
    assert answer.choices[0].finish_reason in ("stop", "tool_calls") and call.id and not message.content
    if choice != "required":
        assert call.function.name == "get_weather"
    args = valid_call(call.function.name, call.function.arguments)
    streamed = streamed_calls(client.chat.completions.create(model=SMOLLM2, messages=ASK, tools=TOOLS,
                                                             tool_choice=choice, max_tokens=100, stream=True))
    assert list(streamed) == [0] and streamed[0]["id"]
    assert streamed[0]["name"] == call.function.name and json.loads(streamed[0]["arguments"]) == args


def test_one_call_without_parallel_calls_and_a_tool_answer_continues_the_conversation(client):
    answer = client.chat.completions.create(model=SMOLLM2, messages=ASK, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False, max_tokens=100)
    message = answer.choices[0].message
    (call,) = message.tool_calls
    valid_call(call.function.name, call.function.arguments)
    turn = [*ASK, message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 18})}]
    reply = client.chat.completions.create(model=SMOLLM2, messages=turn, tools=TOOLS, max_tokens=24)
    assert reply.choices[0].message.content and not reply.choices[0].message.tool_calls


def test_auto_lets_the_model_answer_in_text(client):
    """SmolLM2 does not write Hermes calls of its own: `auto` (on with a parser) answers text, not a 400."""
    answer = client.chat.completions.create(model=SMOLLM2, messages=ASK, tools=TOOLS, max_tokens=16)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


def test_the_responses_api_returns_a_valid_function_call(client):
    answer = client.responses.create(model=SMOLLM2, input=ASK[0]["content"], max_output_tokens=100,
                                     tools=[{"type": "function", **WEATHER}],
                                     tool_choice={"type": "function", "name": "get_weather"})
    (call,) = [item for item in answer.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id
    valid_call(call.name, call.arguments)


@pytest.mark.parametrize("choice", [{"type": "tool", "name": "get_weather"}, {"type": "any"}])
def test_anthropic_messages_return_a_valid_tool_use_block(service, choice):
    tools = [{"name": f["name"], "description": f["description"], "input_schema": f["parameters"]}
             for f in (WEATHER, TIME)]
    r = httpx.post(f"{service.url}/v1/messages", headers=AUTH, timeout=120, json={
        "model": SMOLLM2, "max_tokens": 100, "temperature": 0, "messages": ASK, "tools": tools,
        "tool_choice": choice})
    assert r.status_code == 200, r.text
    body = r.json()
    (block,) = [b for b in body["content"] if b["type"] == "tool_use"]
    assert body["stop_reason"] == "tool_use" and block["id"]
    valid_call(block["name"], block["input"])


def test_a_model_without_a_parser_says_which_config_field_turns_tools_on(client):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                       tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="required")
    message = refused.value.body["message"]
    assert "`tool_call_parser`" in message and "raylm config" in message and "--" not in message, message


def test_reasoning_comes_apart_from_the_answer_whole_and_streamed(client):
    ask = dict(model="tiny-think", messages=[{"role": "user", "content": "hi"}], max_tokens=120, temperature=1.0,
               extra_body={"structured_outputs": {"regex": THINKING}, "seed": 3})
    message = client.chat.completions.create(**ask).choices[0].message
    reasoning, answer = message.reasoning, message.content
    assert len(reasoning.split()) >= 2 and len(answer.split()) >= 2, message
    assert "Here is my" not in reasoning + answer  # the markers are the parser's, not the answer's
    streamed = {"reasoning": "", "content": ""}
    for chunk in client.chat.completions.create(**ask, stream=True):
        for part in streamed:
            streamed[part] += getattr(chunk.choices[0].delta, part, None) or "" if chunk.choices else ""
    assert streamed["content"] == answer
    # vLLM 0.32's Granite parser streams the first word of its "Here is my response:" marker as reasoning.
    assert streamed["reasoning"] in (reasoning, reasoning + "Here"), streamed
    plain = client.chat.completions.create(**{**ask, "model": "tiny"}).choices[0].message  # no parser
    assert plain.content.startswith("Here is my thought process:") and not getattr(plain, "reasoning", None)
