"""Qwen3-Coder tool-call parsing: hand-written model outputs, parsed whole and streamed in any chunking."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from nextserve.cluster.gateway.tool_calls import (
    ParsedOutput,
    TextDelta,
    ToolArgumentsDelta,
    ToolCallEvent,
    ToolCallParser,
    ToolCallStart,
    parse_tool_calls,
    tool_schemas,
)

STRING, INTEGER = {"type": "string"}, {"type": "integer"}
TOOLS: dict[str, dict[str, Any]] = {
    "get_weather": {"type": "object", "properties": {"city": STRING, "days": INTEGER}, "required": ["city"]},
    "typed": {
        "type": "object",
        "properties": {
            "i": INTEGER,
            "n": {"type": "number"},
            "f": {"type": "number"},
            "b": {"type": "boolean"},
            "z": {"type": "null"},
            "o": {"type": "object"},
            "a": {"type": "array"},
            "py": {"type": "object"},
            "s": STRING,
            "bad": INTEGER,
            "maybe": {"type": ["null", "integer"]},
            "notype": {"description": "no type: a string"},
        },
    },
    "write_file": {"type": "object", "properties": {"path": STRING, "content": STRING}},
    "list_files": {},
}


def block(name: str, *params: tuple[str, str], close_params: bool = True) -> str:
    end = "</parameter>\n" if close_params else ""
    body = "".join(f"<parameter={key}>\n{value}\n{end}" for key, value in params)
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


def chunkings(text: str) -> list[list[str]]:
    """The whole text, one character at a time, and a few random chunkings (fixed seed)."""
    rng = random.Random(1234)
    out = [[text], list(text)]
    for _ in range(6):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12)))) if text else []
        out.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])
    return out


def stream(chunks: list[str], max_calls: int | None = None) -> tuple[ToolCallParser, list[ToolCallEvent]]:
    parser = ToolCallParser(TOOLS, max_calls=max_calls)
    events = [e for chunk in chunks for e in parser.feed(chunk)]
    return parser, events + parser.finish()


def text_of(events: list[ToolCallEvent]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def starts_of(events: list[ToolCallEvent]) -> list[tuple[int, str]]:
    return [(e.index, e.name) for e in events if isinstance(e, ToolCallStart)]


def arguments_of(events: list[ToolCallEvent]) -> dict[int, str]:
    out: dict[int, str] = {}
    for e in events:
        if isinstance(e, ToolArgumentsDelta):
            out[e.index] = out.get(e.index, "") + e.fragment
    return out


def check(text: str, max_calls: int | None = None, markup_free: bool = True) -> ParsedOutput:
    """parse_tool_calls(text), after checking that every chunking streams the same result."""
    parsed = parse_tool_calls(text, TOOLS, max_calls=max_calls)
    for call in parsed.tool_calls:
        assert call.arguments_json == json.dumps(call.arguments, ensure_ascii=False)
    for chunks in chunkings(text):
        parser, events = stream(chunks, max_calls)
        content, starts, arguments = text_of(events), starts_of(events), arguments_of(events)
        assert parser.tool_calls == parsed.tool_calls, chunks
        if parser.has_open_call and starts:  # the open call streamed: its raw block is not content
            open_text = parser._open_text
            assert parsed.content is not None and parsed.content == content + open_text
            assert isinstance(json.loads(arguments[len(starts) - 1]), dict)
            starts = starts[:-1]
        else:
            assert (content if content.strip() else None) == parsed.content, chunks
        assert starts == [(i, call.name) for i, call in enumerate(parsed.tool_calls)]
        for i, call in enumerate(parsed.tool_calls):
            assert arguments[i] == call.arguments_json, chunks
            assert json.loads(arguments[i]) == call.arguments
        if markup_free:
            assert not any("<tool_call>" in t or "<function=" in t for t in (content, parsed.content or ""))
    return parsed


def test_typed_arguments() -> None:
    params = [
        ("i", "42"), ("n", "7"), ("f", "-2.5e1"), ("b", "True"), ("z", "null"), ("o", '{"k": [1, 2], "m": null}'),
        ("a", '[1, "x", true]'), ("py", "{'t': (1, 2), 'ok': True}"), ("s", "hello world"), ("extra", "5"),
        ("bad", "abc"), ("maybe", "3"), ("notype", "12"),
    ]  # fmt: skip
    parsed = check(block("typed", *params))
    assert parsed.content is None
    [call] = parsed.tool_calls
    assert call.name == "typed"
    assert call.arguments == {
        "i": 42, "n": 7, "f": -25.0, "b": True, "z": None, "o": {"k": [1, 2], "m": None}, "a": [1, "x", True],
        "py": {"t": [1, 2], "ok": True}, "s": "hello world", "extra": "5", "bad": "abc", "maybe": 3,
        "notype": "12",
    }  # fmt: skip
    assert type(call.arguments["n"]) is int and type(call.arguments["f"]) is float
    assert list(call.arguments) == [key for key, _ in params]


@pytest.mark.parametrize(
    ("kind", "text", "expected"),
    [
        ("integer", "1.5", "1.5"), ("number", "nan", "nan"), ("number", "0x10", "0x10"),
        ("boolean", "yes", "yes"), ("boolean", "FALSE", False), ("null", "none", "none"),
        ("array", "[1, 2", "[1, 2"), ("object", "{1, 2}", "{1, 2}"),
    ],
)  # fmt: skip
def test_failed_conversions_keep_the_text(kind: str, text: str, expected: object) -> None:
    tools = {"f": {"properties": {"x": {"type": kind}}}}
    [call] = parse_tool_calls(block("f", ("x", text)), tools).tool_calls
    assert call.arguments == {"x": expected}


@pytest.mark.parametrize("kind", [["integer", "null"], "integer", "boolean", "array", "object", "number"])
def test_null_is_none_for_every_type_but_string(kind: object) -> None:
    tools = {"f": {"properties": {"x": {"type": kind}, "s": {"type": "string"}}}}
    [call] = parse_tool_calls(block("f", ("x", "null"), ("s", "null")), tools).tool_calls
    assert call.arguments == {"x": None, "s": "null"}


def test_text_before_a_call() -> None:
    parsed = check("Let me check the weather.\n\n" + block("get_weather", ("city", "Paris"), ("days", "3")))
    assert parsed.content == "Let me check the weather.\n\n"
    [call] = parsed.tool_calls
    assert (call.name, call.arguments) == ("get_weather", {"city": "Paris", "days": 3})


def test_parallel_calls_and_text_between_and_after() -> None:
    first, second = block("get_weather", ("city", "Paris")), block("get_weather", ("city", "Oslo"), ("days", "2"))
    parsed = check(f"{first}\n{second}\n")
    assert parsed.content is None
    assert [c.arguments for c in parsed.tool_calls] == [{"city": "Paris"}, {"city": "Oslo", "days": 2}]
    parsed = check(f"{first}\nand\n{second}\n\nDone.")
    assert parsed.content == "\nand\n\n\nDone." and len(parsed.tool_calls) == 2


def test_max_calls_keeps_only_the_first() -> None:
    first, second = block("get_weather", ("city", "Paris")), block("list_files")
    parsed = check(f"Sure.\n{first}\n{second}\n{first}", max_calls=1)
    assert parsed.content == "Sure.\n"
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("get_weather", {"city": "Paris"})]


def test_code_values_may_contain_the_closing_tags() -> None:
    code = (
        'def f(x):\n    return "</parameter>"\n'
        "</parameter>\nnot a tag: nothing structural follows\n"
        "# </function> is a tag too\n"
        's = "<parameter=x>" if x else "</function>"\n'
        "</function>\nprint(1)\n"
    )
    parsed = check(block("write_file", ("path", "a.py"), ("content", code)))
    [call] = parsed.tool_calls
    assert call.arguments == {"path": "a.py", "content": code}
    assert parsed.content is None


def test_missing_closing_tags() -> None:
    text = block("get_weather", ("city", "Paris"), ("days", "4"), close_params=False)
    assert "</parameter>" not in text
    [call] = check(text).tool_calls
    assert call.arguments == {"city": "Paris", "days": 4}
    no_function_end = "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n</tool_call>"
    no_tool_call_end = "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</function>"
    for text in (no_function_end, no_tool_call_end):
        assert not stream([text])[0].has_open_call
        assert [c.arguments for c in check(text).tool_calls] == [{"city": "Rome"}]


def test_unknown_function_is_content() -> None:
    unknown = block("rm_rf", ("path", "/"))
    parsed = check(unknown, markup_free=False)
    assert parsed.content == unknown and parsed.tool_calls == []
    parsed = check(f"{unknown}\n{block('list_files')}", markup_free=False)
    assert parsed.content == unknown + "\n"
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("list_files", {})]
    not_xml = '<tool_call>\n{"name": "get_weather"}\n</tool_call>'
    assert check(not_xml, markup_free=False).content == not_xml


def test_unclosed_call_at_the_end() -> None:
    head = "I'll look.\n<tool_call>\n<function=get_weather>\n<parameter=days>\n2\n</parameter>\n<parameter=city>\nPa"
    for text, name, arguments in [
        (head, "get_weather", '{"days": 2, "city": "Pa"}'),
        (head + "ris\n</para", "get_weather", '{"days": 2, "city": "Paris\\n</para"}'),
        ("<tool_call>\n<function=get_weather>\n<parameter=days>\n2", "get_weather", "{}"),
        ("<tool_call>\n<function=list_files>\n", "list_files", "{}"),
    ]:
        parsed = check(text, markup_free=False)
        assert parsed.tool_calls == [] and parsed.content == text  # whole: all the raw text is content
        for chunks in chunkings(text):
            parser, events = stream(chunks)
            assert parser.has_open_call and parser.tool_calls == []
            assert starts_of(events) == [(0, name)] and arguments_of(events) == {0: arguments}
    # cut before the function name was complete: no call started, the raw text is content
    text = "Hm.\n<tool_call>\n<function=get_wea"
    assert check(text, markup_free=False).content == text
    parser, events = stream(list(text))
    assert parser.has_open_call and text_of(events) == text and starts_of(events) == []


def test_call_without_parameters() -> None:
    [call] = check(block("list_files")).tool_calls
    assert (call.name, call.arguments, call.arguments_json) == ("list_files", {}, "{}")


@pytest.mark.parametrize(
    "text", ["if a < b and c > d: pass", "<tool>x</tool>", "a <tool_call", "<tool_calls> <tool_cal", "<", "x <tool_"]
)
def test_text_that_only_looks_like_a_call(text: str) -> None:
    parsed = check(text)
    assert parsed.content == text and parsed.tool_calls == []


def test_primed_forced_call() -> None:
    parser = ToolCallParser(TOOLS)
    assert parser.feed("<tool_call>\n<function=get_weather>\n") == [ToolCallStart(0, "get_weather")]
    generated = "<parameter=city>\nLima\n</parameter>\n</function>\n</tool_call>"
    events = [e for char in generated for e in parser.feed(char)] + parser.finish()
    assert text_of(events) == "" and arguments_of(events) == {0: '{"city": "Lima"}'}
    assert [c.arguments for c in parser.tool_calls] == [{"city": "Lima"}]


def test_unicode_quotes_and_backslashes() -> None:
    city = 'Zürich "Altstadt" \\ 東京 🌧\ttab\n\nline'
    parsed = check("Wetter? ☀️\n" + block("get_weather", ("city", city)))
    [call] = parsed.tool_calls
    assert call.arguments == {"city": city}
    assert "東京" in call.arguments_json and '\\"Altstadt\\" \\\\' in call.arguments_json
    assert parsed.content == "Wetter? ☀️\n"


def test_values_strip_one_newline_each_side() -> None:
    text = (
        "<tool_call>\n<function=write_file>\n<parameter=content>\n\n  x  \n\n</parameter>\n"
        "<parameter=path>p</parameter>\n</function>\n</tool_call>"
    )
    [call] = check(text).tool_calls
    assert call.arguments == {"content": "\n  x  \n", "path": "p"}


def test_repeated_parameter_keeps_the_first() -> None:
    [call] = check(block("get_weather", ("city", "A"), ("days", "1"), ("city", "B"))).tool_calls
    assert call.arguments == {"city": "A", "days": 1}


def test_content_streams_early() -> None:
    parser = ToolCallParser(TOOLS)
    assert text_of(parser.feed("Hello wor")) == "Hello wor"
    assert text_of(parser.feed("ld <tool_c")) == "ld "  # "<tool_c" may still start a call
    assert text_of(parser.feed("ar")) == "<tool_car"
    assert parser.finish() == []


def test_string_values_stream_early() -> None:
    parser = ToolCallParser(TOOLS)
    events = parser.feed("<tool_call>\n<function=write_file>\n<parameter=content>\nab")
    assert arguments_of(events) == {0: '{"content": "ab'}
    assert arguments_of(parser.feed("c\n")) == {0: "c"}  # the newline may be the stripped last one
    assert arguments_of(parser.feed("d\n</par")) == {0: "\\nd"}
    assert arguments_of(parser.feed("ameter>\n<parameter=path>\n7")) == {0: '", "path": "7'}
    assert arguments_of(parser.feed("\n</parameter>\n</function>")) == {0: '"}'}  # between parameters: the end
    assert parser.feed("\n</tool_call>") == []
    assert [c.arguments for c in parser.tool_calls] == [{"content": "abc\nd", "path": "7"}]


def test_non_string_values_come_whole() -> None:
    parser = ToolCallParser(TOOLS)
    parser.feed("<tool_call>\n<function=get_weather>\n<parameter=days>\n1")
    assert arguments_of(parser.feed("2\n</parameter>")) == {}
    assert arguments_of(parser.feed("\n<")) == {}  # "<" may still be "<parameter="
    assert arguments_of(parser.feed("parameter=")) == {0: '{"days": 12'}


def test_tool_schemas() -> None:
    weather = {"name": "get_weather", "description": "d", "parameters": TOOLS["get_weather"]}
    tools = [{"type": "function", "function": weather}, {"type": "function", "function": {"name": "list_files"}}]
    assert tool_schemas(tools) == {"get_weather": TOOLS["get_weather"], "list_files": {}}
