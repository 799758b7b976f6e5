"""Tool calls through tiergate, read by the unmodified `openai` SDK.

Usage: python3 tests/sdk/tool_calls.py BASE_URL MODEL
Checks, streamed and not, that the SDK parses the calls the scripted upstream makes
(tests/common/upstream.rs, Script::ToolCalls) and that a second turn carrying the results
goes through. Exits non-zero with the reason on any mismatch.
"""

import json
import sys

from openai import OpenAI

EXPECTED = [
    ("call_weather_1", "get_weather", {"city": "Paris", "unit": "celsius"}),
    ("call_time_2", "get_time", {"timezone": "Europe/Paris"}),
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}},
        },
    },
]


def check_calls(message, how):
    calls = [(c.id, c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]
    assert calls == EXPECTED, f"{how}: got {calls}"
    assert all(c.type == "function" for c in message.tool_calls), how


def main():
    base, model = sys.argv[1], sys.argv[2]
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    question = [{"role": "user", "content": "What is the weather and the time in Paris?"}]

    reply = client.chat.completions.create(model=model, messages=question, tools=TOOLS, tool_choice="auto")
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice.finish_reason
    assert choice.message.content is None, choice.message.content
    check_calls(choice.message, "non-streaming")
    assert reply.usage.completion_tokens == 30, reply.usage

    # The SDK's stream helper folds the deltas itself, validating every chunk's shape.
    with client.chat.completions.stream(model=model, messages=question, tools=TOOLS) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls", final.choices[0].finish_reason
    check_calls(final.choices[0].message, "streaming")

    # The second turn: the assistant's calls and each tool's result go back.
    follow_up = question + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [c.model_dump() for c in choice.message.tool_calls],
        },
        {"role": "tool", "tool_call_id": "call_weather_1", "content": '{"temp": 18}'},
        {"role": "tool", "tool_call_id": "call_time_2", "content": '"14:05"'},
    ]
    again = client.chat.completions.create(model=model, messages=follow_up, tools=TOOLS)
    check_calls(again.choices[0].message, "second turn")
    print("ok")


if __name__ == "__main__":
    main()
