"""Drives kvroute with the OpenAI Python SDK, as an application would.

Usage: sdk_client.py BASE_URL CA_FILE API_KEY MODEL

Runs a chat completion and a text completion, each non-streamed and streamed
(with usage), over one client (so over kept-alive TLS connections), then one
request with a wrong key. Prints one JSON object per line for the Rust test to
check; any SDK exception other than the expected authentication error makes
the script exit non-zero with the exception on stderr.
"""

import json
import sys

import openai


def main() -> None:
    base_url, ca_file, api_key, model = sys.argv[1:5]
    # The SDK's own default HTTP client, trusting only the test CA.
    http = openai.DefaultHttpx2Client(verify=ca_file, timeout=30.0)
    client = openai.OpenAI(base_url=base_url, api_key=api_key, http_client=http, max_retries=0)
    messages = [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three prime numbers."},
    ]

    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=8)
    emit(
        case="chat",
        object=chat.object,
        content=chat.choices[0].message.content,
        finish_reason=chat.choices[0].finish_reason,
        prompt_tokens=chat.usage.prompt_tokens if chat.usage else None,
    )

    chunks, text, finish, usage = 0, "", None, None
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage.prompt_tokens
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    emit(case="chat_stream", chunks=chunks, content=text, finish_reason=finish, prompt_tokens=usage)

    done = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8)
    emit(case="completion", object=done.object, text=done.choices[0].text,
         finish_reason=done.choices[0].finish_reason)

    chunks, text = 0, ""
    for chunk in client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=8, stream=True
    ):
        chunks += 1
        text += chunk.choices[0].text if chunk.choices else ""
    emit(case="completion_stream", chunks=chunks, text=text)

    wrong = openai.OpenAI(base_url=base_url, api_key=api_key + "-wrong", http_client=http, max_retries=0)
    try:
        wrong.chat.completions.create(model=model, messages=messages, max_tokens=8)
        emit(case="wrong_key", status=200)
    except openai.AuthenticationError as e:
        body = e.body if isinstance(e.body, dict) else {}
        emit(case="wrong_key", status=e.status_code, code=body.get("code"), type=body.get("type"))


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


if __name__ == "__main__":
    main()
