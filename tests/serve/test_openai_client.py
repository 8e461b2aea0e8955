"""The stock ``openai`` client, unchanged, against a live server: completions, chat, streaming with usage,
models, and its exceptions for our error answers."""

from __future__ import annotations

import openai
import pytest


def client(live, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key=key, max_retries=0, timeout=60)


def test_completion_chat_and_models(live, store_users):
    api = client(live, store_users.keys["lora-user-0"])
    completion = api.completions.create(
        model="lora-user-0", prompt="The weather today", max_tokens=6, temperature=0
    )
    assert completion.object == "text_completion"
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.completion_tokens <= 6 and completion.usage.prompt_tokens > 0
    assert (
        completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    )

    chat = api.chat.completions.create(
        model="lora-user-0", messages=[{"role": "user", "content": "Say hi"}], max_tokens=5, temperature=0
    )
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"
    assert isinstance(chat.choices[0].message.content, str)

    models = api.models.list()
    assert [m.id for m in models.data] == ["lora-user-0"]
    assert api.models.retrieve("lora-user-0").id == "lora-user-0"


def test_streaming_chat_equals_the_whole_answer(live, store_users):
    api = client(live, store_users.keys["ia3-user-1"])
    messages = [{"role": "user", "content": "Tell me a story"}]
    whole = api.chat.completions.create(model="ia3-user-1", messages=messages, max_tokens=8, temperature=0)
    stream = api.chat.completions.create(
        model="ia3-user-1",
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_streaming_completion(live, store_users):
    api = client(live, store_users.keys["prompt-user-0"])
    whole = api.completions.create(model="prompt-user-0", prompt="Once upon", max_tokens=6, temperature=0)
    pieces = list(
        api.completions.create(
            model="prompt-user-0", prompt="Once upon", max_tokens=6, temperature=0, stream=True
        )
    )
    assert "".join(p.choices[0].text for p in pieces) == whole.choices[0].text


def test_stop_strings_cut_the_answer(live, store_users):
    api = client(live, store_users.keys["lora-user-1"])
    full = (
        api.completions.create(model="lora-user-1", prompt="Count:", max_tokens=12, temperature=0)
        .choices[0]
        .text
    )
    stop = full[3:5]
    if not stop.strip():
        pytest.skip("the tiny model's answer has no usable stop string here")
    cut = api.completions.create(
        model="lora-user-1", prompt="Count:", max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_labels_pick_the_best_scoring_label(live, store_users):
    api = client(live, store_users.keys["bottleneck-user-0"])
    answer = api.completions.create(
        model="bottleneck-user-0", prompt="Is this rude?", extra_body={"labels": ["yes", "no", "maybe"]}
    )
    scores = answer.choices[0].model_extra["label_scores"]
    assert set(scores) == {"yes", "no", "maybe"}
    assert answer.choices[0].text == max(scores, key=scores.get)


def test_errors_become_the_clients_exceptions(live, store_users):
    own = client(live, store_users.keys["lora-user-0"])
    with pytest.raises(openai.NotFoundError) as unknown:
        own.completions.create(model="nobody", prompt="x", max_tokens=2)
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as other:
        own.completions.create(model="ia3-user-0", prompt="x", max_tokens=2)
    assert other.value.body == unknown.value.body | {"message": other.value.body["message"]}
    assert "ia3-user-0" in other.value.body["message"]
    with pytest.raises(openai.AuthenticationError) as bad:
        client(live, "tlm-u-not-a-key").completions.create(model="lora-user-0", prompt="x", max_tokens=2)
    assert bad.value.code == "invalid_api_key"
    with pytest.raises(openai.BadRequestError):
        own.completions.create(model="lora-user-0", prompt="x", max_tokens=2, temperature=5)
