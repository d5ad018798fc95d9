from semantic_core.engine.types import Finished, GenerationRequest, Started, TextDelta


def test_tiny_engine_generates(tiny_engine):
    r = tiny_engine.render([{"role": "user", "content": "Hello, world!"}])
    events = list(tiny_engine.generate(GenerationRequest(tokens=r.tokens, max_tokens=12, temperature=0.0)))
    assert isinstance(events[0], Started)
    assert isinstance(events[-1], Finished)
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    res = events[-1].result
    assert res.text == text
    assert res.usage.output_tokens >= 1
    print(res)
