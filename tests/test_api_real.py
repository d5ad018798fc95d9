"""The API with the real default model, through the official SDK."""

from __future__ import annotations

import anthropic
import pytest

pytestmark = pytest.mark.real_model
T0 = {"temperature": 0}


@pytest.fixture
def real_client(server_factory, real_loaded):
    server = server_factory(loaded=real_loaded)
    return anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0)


def test_paris_through_the_sdk_streaming(real_client):
    with real_client.messages.stream(
        model="claude-local-test",
        max_tokens=30,
        extra_body=T0,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    ) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert "Paris" in text and final.content[0].text == text and final.stop_reason == "end_turn"


def test_assistant_prefill_is_continued(real_client):
    msg = real_client.messages.create(
        model="smollm2-135m-instruct",
        max_tokens=20,
        extra_body=T0,
        messages=[
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is"},
        ],
    )
    assert msg.content[0].text.startswith(" Paris")
