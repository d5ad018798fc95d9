"""Tool use on the real tool model (Qwen2.5-Coder-0.5B-Instruct), through the official anthropic and
openai SDKs against a real server: what it calls, how it calls, and what the next turn reuses."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

MODEL = "qwen2.5-coder-0.5b-instruct"
WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city"],
    },
}
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]


@pytest.fixture(scope="module")
def qwen_api(tmp_path_factory, qwen_loaded):
    from tests.api_server import ServerThread
    from tests.conftest import make_settings

    tmp = tmp_path_factory.mktemp("qwen-tools")
    # Greedy, so each answer is the same every run (Qwen's own defaults sample).
    settings = make_settings(tmp, server_log_level="WARNING", mlx_model_sampling=False)
    server = ServerThread(settings, qwen_loaded).start()
    yield server
    server.stop()


def test_qwen_calls_the_tool_it_is_asked_about_and_reads_the_result(qwen_api):
    client = anthropic.Anthropic(base_url=qwen_api.url, api_key="test", max_retries=0)
    first = client.messages.create(
        model=MODEL, max_tokens=100, tools=[WEATHER], messages=ASK, extra_headers={"x-agent-id": "weather"}
    )
    # Asked through its own template, it answers with the call (tagged, bare or fenced JSON).
    assert first.stop_reason == "tool_use"
    call = next(b for b in first.content if b.type == "tool_use")
    assert call.name == "get_weather" and call.input["city"] == "Paris"
    convo = [
        *ASK,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18 C, sunny"}]},
    ]
    raw = client.messages.with_raw_response.create(
        model=MODEL, max_tokens=40, tools=[WEATHER], messages=convo, extra_headers={"x-agent-id": "weather"}
    )
    second = raw.parse()
    # The whole first prompt comes from the cache; where the model spelled its call otherwise than
    # the template renders it, the header says so, pointing at the assistant's message.
    prompt1 = first.usage.input_tokens + first.usage.cache_read_input_tokens
    assert second.usage.cache_read_input_tokens >= prompt1
    if second.usage.cache_read_input_tokens < prompt1 + first.usage.output_tokens - 1:
        assert raw.headers["x-semantic-cache-miss"].startswith("message=1; ")


def test_qwen_forced_and_streamed_tool_use(qwen_api):
    client = anthropic.Anthropic(base_url=qwen_api.url, api_key="test", max_retries=0)
    with client.messages.stream(
        model=MODEL,
        max_tokens=100,
        tools=[WEATHER],
        tool_choice={"type": "any"},
        messages=[{"role": "user", "content": "Weather in Rome, in fahrenheit?"}],
    ) as stream:
        final = stream.get_final_message()
    calls = [b for b in final.content if b.type == "tool_use"]
    assert final.stop_reason == "tool_use" and calls
    assert calls[0].input == {"city": "Rome", "unit": "f"}
    assert all(b.type == "tool_use" for b in final.content)  # "any": calls and nothing else


def test_qwen_through_the_openai_sdk(qwen_api):
    client = openai.OpenAI(base_url=f"{qwen_api.url}/v1", api_key="test", max_retries=0)
    tool = {
        "type": "function",
        "function": {
            "name": WEATHER["name"],
            "description": WEATHER["description"],
            "parameters": WEATHER["input_schema"],
        },
    }
    r = client.chat.completions.create(model=MODEL, max_tokens=100, tools=[tool], tool_choice="required", messages=ASK)
    assert r.choices[0].finish_reason == "tool_calls"
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] == "Paris"
    r = client.chat.completions.create(
        model=MODEL,
        max_tokens=60,
        messages=[{"role": "user", "content": "Ann is 31 years old. Give her as JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {
                "name": "person",
                "schema": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                    "required": ["name", "age"],
                },
            },
        },
    )
    assert json.loads(r.choices[0].message.content) == {"name": "Ann", "age": 31}
