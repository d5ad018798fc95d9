"""Tool use and structured output through both APIs, on a tiny random-weight model whose chat
template takes tools. Its answers are noise, so whatever it calls and however it fills the
arguments is the grammar's doing: these tests hold constrained decoding to the schemas."""

from __future__ import annotations

import io
import json

import anthropic
import httpx
import openai
import pytest

from semantic_core.observability import configure_logging, flush_logging

GREEDY = {"temperature": 0}
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "enum": ["Paris", "Oslo", "Rome"]},
            "unit": {"type": "string", "enum": ["c", "f"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "unit", "days"],
        "additionalProperties": False,
    },
}
CLOCK = {
    "name": "get_time",
    "description": "The time in a zone",
    "input_schema": {
        "type": "object",
        "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
        "required": ["zone"],
        "additionalProperties": False,
    },
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "likes_tea": {"type": "boolean"},
    },
    "required": ["name", "age", "likes_tea"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]


def weather_ok(args: dict) -> bool:
    return (
        set(args) == {"city", "unit", "days"}
        and args["city"] in ("Paris", "Oslo", "Rome")
        and args["unit"] in ("c", "f")
        and isinstance(args["days"], int)
        and 1 <= args["days"] <= 7
    )


@pytest.fixture
def tool_api(server_factory, tiny_tools_loaded):
    return server_factory(loaded=tiny_tools_loaded)


@pytest.fixture
def claude(tool_api):
    return anthropic.Anthropic(base_url=tool_api.url, api_key="test", max_retries=0)


@pytest.fixture
def oai(tool_api):
    return openai.OpenAI(base_url=f"{tool_api.url}/v1", api_key="test", max_retries=0)


def test_forced_tool_use_follows_the_schema(claude):
    r = claude.messages.create(
        model="tiny-tools",
        max_tokens=200,
        tools=[WEATHER, CLOCK],
        tool_choice={"type": "any"},
        messages=ASK,
        extra_body=GREEDY,
    )
    assert r.stop_reason == "tool_use"
    calls = [b for b in r.content if b.type == "tool_use"]
    assert calls and all(c.id.startswith("toolu_") for c in calls)
    for call in calls:
        assert call.name in ("get_weather", "get_time")
        if call.name == "get_weather":
            assert weather_ok(call.input), call.input
        else:
            assert call.input["zone"] in ("UTC", "CET")


def test_a_named_tool_and_no_parallel_calls(claude):
    r = claude.messages.create(
        model="tiny-tools",
        max_tokens=200,
        tools=[WEATHER, CLOCK],
        tool_choice={"type": "tool", "name": "get_time", "disable_parallel_tool_use": True},
        messages=ASK,
        extra_body=GREEDY,
    )
    calls = [b for b in r.content if b.type == "tool_use"]
    assert r.stop_reason == "tool_use" and len(calls) == 1
    assert calls[0].name == "get_time" and calls[0].input["zone"] in ("UTC", "CET")


def test_streamed_tool_use_matches_the_plain_answer(claude):
    kwargs = {
        "model": "tiny-tools",
        "max_tokens": 200,
        "tools": [WEATHER],
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "messages": ASK,
        "extra_body": GREEDY,
    }
    plain = claude.messages.create(**kwargs)
    kinds = []
    with claude.messages.stream(**kwargs) as stream:
        for event in stream:
            kinds.append((event.type, getattr(getattr(event, "content_block", None), "type", None)))
        final = stream.get_final_message()
    assert ("content_block_start", "tool_use") in kinds and "input_json" in {k for k, _ in kinds}
    assert final.stop_reason == "tool_use"
    assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == [
        (b.name, b.input) for b in plain.content if b.type == "tool_use"
    ]


def test_a_tool_round_trip_reuses_the_cache_of_the_call(claude):
    first = claude.messages.create(
        model="tiny-tools",
        max_tokens=200,
        tools=[WEATHER],
        tool_choice={"type": "any"},
        messages=ASK,
        extra_body=GREEDY,
    )
    call = next(b for b in first.content if b.type == "tool_use")
    convo = [
        *ASK,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18 C, sunny"}]},
    ]
    raw = claude.messages.with_raw_response.create(
        model="tiny-tools", max_tokens=5, tools=[WEATHER], messages=convo, extra_body=GREEDY
    )
    second = raw.parse()
    # The first prompt is cached at least. The resent call renders to the text that was generated,
    # but noise may have spelled it in other tokens than the tokenizer's: where the cache was left
    # is then said (in the assistant's message, the first turn's answer).
    u1, u2 = first.usage, second.usage
    answered = u1.input_tokens + u1.cache_read_input_tokens + u1.output_tokens
    assert u2.cache_read_input_tokens >= u1.input_tokens
    if u2.cache_read_input_tokens < answered - 2:
        miss = raw.headers["x-semantic-cache-miss"]
        assert miss.startswith("message=1; ") and f"token={u2.cache_read_input_tokens}; cached={answered}" in miss
    with pytest.raises(anthropic.BadRequestError, match="tool_use_id"):
        claude.messages.create(
            model="tiny-tools",
            max_tokens=5,
            tools=[WEATHER],
            messages=[*convo[:2], {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_nope"}]}],
        )


def test_error_results_and_text_lists_are_accepted(claude):
    first = claude.messages.create(
        model="tiny-tools",
        max_tokens=200,
        tools=[WEATHER],
        tool_choice={"type": "any"},
        messages=ASK,
        extra_body=GREEDY,
    )
    calls = [b for b in first.content if b.type == "tool_use"]
    results = [
        {"type": "tool_result", "tool_use_id": c.id, "is_error": True, "content": [{"type": "text", "text": "down"}]}
        for c in calls
    ]
    convo = [
        *ASK,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {"role": "user", "content": [*results, {"type": "text", "text": "try again"}]},
    ]
    r = claude.messages.create(model="tiny-tools", max_tokens=5, tools=[WEATHER], messages=convo, extra_body=GREEDY)
    assert r.usage.cache_read_input_tokens > 0
    # is_error reaches the model ("Error: " before the result), not only the validation.
    plain = [{**result, "is_error": False} for result in results]
    ok_convo = [*convo[:2], {"role": "user", "content": [*plain, {"type": "text", "text": "try again"}]}]
    counted = claude.messages.count_tokens(model="tiny-tools", tools=[WEATHER], messages=convo).input_tokens
    counted_ok = claude.messages.count_tokens(model="tiny-tools", tools=[WEATHER], messages=ok_convo).input_tokens
    assert counted > counted_ok


def test_tool_choice_none_never_calls(claude):
    r = claude.messages.create(
        model="tiny-tools",
        max_tokens=40,
        tools=[WEATHER],
        tool_choice={"type": "none"},
        messages=ASK,
        extra_body=GREEDY,
    )
    assert all(b.type == "text" for b in r.content) and "<tool_call>" not in r.content[0].text


def test_the_none_grammar_masks_the_call_tag_and_auto_allows_it(tiny_tools_loaded):
    # Noise seldom samples the tag in a short answer, so hold the grammar itself to it.
    import numpy as np

    from semantic_core.engine.constraints import Grammars
    from semantic_core.model.tools import ToolFormat, ToolSpec, tool_grammar

    tok = tiny_tools_loaded.tokenizer
    fmt = ToolFormat.of(tok)
    vocab = tiny_tools_loaded.info.vocab_size
    grammars = Grammars(tok, vocab, sorted(tok.eos_token_ids))
    tools = [ToolSpec(WEATHER["name"], WEATHER["description"], WEATHER["input_schema"])]

    def allowed(choice: str) -> set[int]:
        matcher = grammars.compile(tool_grammar(fmt, tools, choice), choice).matcher.deep_copy()
        mask = np.zeros(((vocab + 31) // 32,), dtype=np.int32)
        matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab]
        return set(np.nonzero(bits)[0].tolist())

    assert fmt.start_token not in allowed("none")
    assert fmt.start_token in allowed("auto")
    assert allowed("any") == {fmt.start_token}


def test_structured_output_is_json_of_the_schema(claude):
    r = claude.messages.create(
        model="tiny-tools",
        max_tokens=200,
        messages=[{"role": "user", "content": "Describe a person."}],
        output_config={"format": {"type": "json_schema", "schema": PERSON}},
        extra_body=GREEDY,
    )
    value = json.loads(r.content[0].text)
    assert set(value) == {"name", "age", "likes_tea"} and len(value["name"]) <= 6
    assert isinstance(value["age"], int) and isinstance(value["likes_tea"], bool)


def test_count_tokens_counts_the_tools(claude):
    without = claude.messages.count_tokens(model="tiny-tools", messages=ASK).input_tokens
    with_tools = claude.messages.count_tokens(model="tiny-tools", messages=ASK, tools=[WEATHER, CLOCK]).input_tokens
    assert with_tools > without + 50


def test_a_schema_the_grammar_cannot_hold_is_400(claude):
    with pytest.raises(anthropic.BadRequestError, match="no tool named"):
        claude.messages.create(
            model="tiny-tools",
            max_tokens=5,
            tools=[WEATHER],
            tool_choice={"type": "tool", "name": "nope"},
            messages=ASK,
        )
    with pytest.raises(anthropic.BadRequestError, match="unique"):
        claude.messages.create(model="tiny-tools", max_tokens=5, tools=[WEATHER, WEATHER], messages=ASK)
    with pytest.raises(anthropic.BadRequestError, match="Anthropic's own tools"):
        claude.messages.create(
            model="tiny-tools", max_tokens=5, tools=[{"type": "bash_20250124", "name": "bash"}], messages=ASK
        )


# The OpenAI shape ----------------------------------------------------------------------------------

OAI_WEATHER = {
    "type": "function",
    "function": {"name": WEATHER["name"], "description": WEATHER["description"], "parameters": WEATHER["input_schema"]},
}


def test_openai_required_tool_call_and_its_result(oai):
    r = oai.chat.completions.create(
        model="tiny-tools",
        max_tokens=200,
        temperature=0,
        tools=[OAI_WEATHER],
        tool_choice="required",
        messages=ASK,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert weather_ok(json.loads(call.function.arguments))
    convo = [
        *ASK,
        choice.message.model_dump(exclude_none=True),
        *[{"role": "tool", "tool_call_id": c.id, "content": "18 C"} for c in choice.message.tool_calls],
    ]
    again = oai.chat.completions.create(
        model="tiny-tools", max_tokens=5, temperature=0, tools=[OAI_WEATHER], messages=convo
    )
    assert again.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(
            model="tiny-tools",
            max_tokens=5,
            messages=[*convo[:2], {"role": "tool", "tool_call_id": "x", "content": "?"}],
        )
    assert err.value.body["type"] == "invalid_request_error" and "tool_call_id" in err.value.body["message"]


def test_openai_streams_a_named_call_then_done(tool_api, oai):
    stream = oai.chat.completions.create(
        model="tiny-tools",
        max_tokens=200,
        temperature=0,
        tools=[OAI_WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        messages=ASK,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].index == 0 and weather_ok(json.loads(calls[0].function.arguments))
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    with httpx.stream(
        "POST",
        f"{tool_api.url}/v1/chat/completions",
        json={"model": "tiny-tools", "max_tokens": 3, "messages": ASK, "stream": True},
        timeout=60,
    ) as raw:
        lines = [line for line in raw.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"


def test_openai_json_schema_and_json_object(oai):
    r = oai.chat.completions.create(
        model="tiny-tools",
        max_tokens=200,
        temperature=0,
        messages=[{"role": "user", "content": "A person, please."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
    )
    assert set(json.loads(r.choices[0].message.content)) == {"name", "age", "likes_tea"}
    r = oai.chat.completions.create(
        model="tiny-tools",
        max_tokens=60,
        temperature=0,
        messages=[{"role": "user", "content": "Anything."}],
        response_format={"type": "json_object"},
    )
    if r.choices[0].finish_reason == "stop":  # noise may run out of tokens inside the object
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.lstrip().startswith("{")


def test_openai_errors_are_in_openai_shape(tool_api, oai):
    with pytest.raises(openai.NotFoundError) as err:
        oai.chat.completions.create(model="no-such-model", messages=ASK)
    assert err.value.body["type"] == "not_found_error" and "no-such-model" in err.value.body["message"]
    r = httpx.post(f"{tool_api.url}/v1/chat/completions", json={"model": "tiny-tools"}, timeout=30)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert "messages" in r.json()["error"]["message"]
    listed = oai.models.list().data
    assert [m.id for m in listed] == ["tiny-tools"] and listed[0].owned_by


# A model that cannot call tools ------------------------------------------------------------------


def test_a_model_without_tools_refuses_forced_calls_and_serves_auto_as_chat(api, client):
    with pytest.raises(anthropic.BadRequestError, match="cannot call tools"):
        client.messages.create(model="tiny", max_tokens=5, tools=[WEATHER], tool_choice={"type": "any"}, messages=ASK)
    r = httpx.post(
        f"{api.url}/v1/messages",
        json={"model": "tiny", "max_tokens": 5, "tools": [WEATHER], "messages": ASK},
        timeout=60,
    )
    assert r.status_code == 200 and "cannot call tools" in r.headers["x-semantic-warning"]
    # Structured output needs no tool template: the grammar holds any model to the schema.
    r = client.messages.create(
        model="tiny",
        max_tokens=200,
        messages=[{"role": "user", "content": "A person."}],
        output_config={"format": {"type": "json_schema", "schema": PERSON}},
        extra_body=GREEDY,
    )
    assert set(json.loads(r.content[0].text)) == {"name", "age", "likes_tea"}


# What Claude Code relies on ---------------------------------------------------------------------------


def test_head_root_and_the_anthropic_wording_of_context_errors(server_factory):
    api = server_factory(server_max_output_tokens=100)
    assert httpx.head(f"{api.url}/", timeout=10).status_code == 200
    client = anthropic.Anthropic(base_url=api.url, api_key="test", max_retries=0)
    raw = httpx.post(
        f"{api.url}/v1/messages", json={"model": "tiny", "max_tokens": 64000, "messages": ASK, **GREEDY}, timeout=60
    )
    assert raw.headers["x-semantic-max-tokens"].startswith("100;") and raw.json()["usage"]["output_tokens"] <= 100
    context = 8192
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model="tiny", max_tokens=5, messages=[{"role": "user", "content": "fox " * 9000}])
    assert "prompt is too long: " in err.value.message and f"tokens > {context} maximum" in err.value.message
    long = [{"role": "user", "content": "The quick brown fox. " * 1620}]
    n = client.messages.count_tokens(model="tiny", messages=long).input_tokens
    assert n < context < n + 100, "the prompt must fit, but leave less room than the cap"
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model="tiny", max_tokens=100, messages=long)
    assert err.value.body["error"]["message"].startswith(
        f"input length and `max_tokens` exceed context limit: {n} + 100 > {context}, decrease input length"
    )


def test_error_lines_in_the_access_log_say_why(server_factory):
    stream = io.StringIO()
    configure_logging("INFO", stream=stream)
    try:
        api = server_factory(server_log_level="INFO")
        r = httpx.post(f"{api.url}/v1/messages", json={"model": "tiny", "messages": ASK}, timeout=30)
        flush_logging()
    finally:
        configure_logging("WARNING")
    assert r.status_code == 400
    line = next(line for line in stream.getvalue().splitlines() if "status=400" in line)
    assert "error_type=invalid_request_error" in line and "max_tokens" in line


def test_a_volatile_billing_line_in_the_system_prompt_does_not_break_the_cache(client):
    def ask(version: str):
        system = [
            {"type": "text", "text": f"x-anthropic-billing-header: cc_version={version}; cc_entrypoint=cli;"},
            {"type": "text", "text": "You are a helpful coding agent. " * 20},
        ]
        return client.messages.create(model="tiny", max_tokens=3, system=system, messages=ASK, extra_body=GREEDY)

    first, second = ask("2.1.197.abc"), ask("2.1.197.def")
    assert second.usage.cache_read_input_tokens >= first.usage.input_tokens - 1
