"""Qwen3-Coder tool calls: an incremental parser for the XML-like blocks the model writes.

After some plain text (or none), the model calls tools with one or more blocks (parallel calls):

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    <parameter=days>
    3
    </parameter>
    </function>
    </tool_call>

A value is raw text with one leading and one trailing newline stripped, typed by the JSON schema of
that parameter: string stays text; integer, number, boolean, null, object and array are converted
(a parameter with anyOf / enum / const and no type is read as JSON), and a value that does not convert
stays text. Code values may hold the closing tags literally, so a
tag is structural only in context:

    <parameter=    between parameters, or at a line start inside a value (a missing </parameter>)
    </parameter>   when <parameter=, </function> or </tool_call> follows (after whitespace), or the end
    </function>    between parameters; inside a value only when </tool_call> or the end follows

Flow: feed(chunk) -> events ... finish() -> events. Text outside calls streams out as TextDelta as
soon as it can no longer be the start of "<tool_call>" (whitespace-only text after a call is dropped).
A block yields ToolCallStart once "<function=NAME>" names a known tool (an unknown name makes the
block plain text), then ToolArgumentsDelta fragments that concatenate to exactly
json.dumps(arguments): a string value streams as it is generated, other values come whole when their
parameter closes, "}" when the function closes. parse_tool_calls() runs the same parser on a whole
output.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TOOL_CALL, TOOL_CALL_END = "<tool_call>", "</tool_call>"
FUNCTION, FUNCTION_END = "<function=", "</function>"
PARAMETER, PARAMETER_END = "<parameter=", "</parameter>"
MAX_NAME = 256  # a "<function=" or "<parameter=" whose name runs longer than this is not a tag

_NAME = rf"[^>\n]{{,{MAX_NAME}}}"
_FUNCTION, _FUNCTION_HEAD = re.compile(f"<function=({_NAME})>"), re.compile(f"<function={_NAME}")
_PARAMETER, _PARAMETER_HEAD = re.compile(f"<parameter=({_NAME})>"), re.compile(f"<parameter={_NAME}")
_VALUE_END = re.compile(r"</parameter>|(?<=\n)<parameter=|</function>")
_FOLLOWERS = {PARAMETER_END: (PARAMETER, FUNCTION_END, TOOL_CALL_END), FUNCTION_END: (TOOL_CALL_END,)}
_TYPES = {"string", "integer", "number", "boolean", "null", "object", "array"}
_JSON_KEYWORDS = ("anyOf", "oneOf", "allOf", "enum", "const", "$ref")


@dataclass(frozen=True, slots=True)
class TextDelta:  # plain content text
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallStart:  # a call's name is known; index counts the calls of this output from 0
    index: int
    name: str


@dataclass(frozen=True, slots=True)
class ToolArgumentsDelta:  # a fragment of the call's arguments as JSON text
    index: int
    fragment: str


ToolCallEvent = TextDelta | ToolCallStart | ToolArgumentsDelta


@dataclass(frozen=True, slots=True)
class ParsedToolCall:
    name: str
    arguments: dict[str, Any]  # typed by the schema
    arguments_json: str  # json.dumps(arguments, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class ParsedOutput:
    content: str | None  # text outside calls; None when empty or whitespace only
    tool_calls: list[ParsedToolCall]


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _partial(text: str, *tags: str) -> int:
    """Length of the longest suffix of text that may still grow into one of tags."""
    for k in range(min(len(text), max(map(len, tags)) - 1), 0, -1):
        if any(tag.startswith(text[-k:]) for tag in tags):
            return k
    return 0


def _param_type(schema: Mapping[str, Any], key: str) -> str:
    """The JSON-schema type of a parameter: the first non-null one of a list; string when unknown."""
    properties = schema.get("properties")
    prop = properties.get(key) if isinstance(properties, Mapping) else None
    if isinstance(prop, Mapping) and "type" not in prop and any(k in prop for k in _JSON_KEYWORDS):
        return "json"  # anyOf / enum / const without a type: the value is written as JSON (a forced call's grammar)
    kind = prop.get("type") if isinstance(prop, Mapping) else None
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    return kind if isinstance(kind, str) and kind in _TYPES else "string"


def _convert(text: str, kind: str) -> Any:
    """A value's text as its schema type; the text itself when it does not convert."""
    word = text.strip().lower()
    if kind != "string" and text.strip() == "null":  # e.g. an ["integer", "null"] parameter left empty
        return None
    try:
        if kind == "integer":
            return int(text)
        if kind == "number":
            try:
                return int(text)
            except ValueError:
                number = float(text)
                return number if math.isfinite(number) else text
        if kind == "boolean" and word in ("true", "false"):
            return word == "true"
        if kind == "null" and word == "null":
            return None
        if kind in ("object", "array", "json"):
            try:
                return json.loads(text)
            except ValueError:  # Python literals: single quotes, True, tuples (made JSON values)
                return json.loads(json.dumps(ast.literal_eval(text.strip())))
    except Exception:  # noqa: BLE001 - any failed conversion keeps the text
        pass
    return text


def _value_end(v: str, scan: int, final: bool) -> tuple[int, int, int]:
    """Where the value text v ends and where parsing resumes after it; (-1, -1, hold) while it is
    still open, where the text from hold on may yet be (part of) a closing tag. Candidates before
    scan were already ruled out; final: the output ended, so an undecided tag closes the value."""
    for m in _VALUE_END.finditer(v, scan):
        tag = m.group()
        if tag == PARAMETER:  # a line-start <parameter=: the model left out </parameter>
            return m.start(), m.start(), m.start()
        follow, tags = v[m.end() :].lstrip(), _FOLLOWERS[tag]
        maybe = not follow or any(t.startswith(follow) for t in tags)
        if any(follow.startswith(t) for t in tags) or (final and maybe):
            return m.start(), m.end() if tag == PARAMETER_END else m.start(), m.start()
        if maybe:
            return -1, -1, m.start()
    return -1, -1, len(v) if final else len(v) - _partial(v, PARAMETER_END, FUNCTION_END, PARAMETER)


class ToolCallParser:
    """Turns the decoded text of one output, chunk by chunk, into content and tool-call events."""

    def __init__(self, tools: Mapping[str, Mapping[str, Any]], *, max_calls: int | None = None) -> None:
        """tools: function name -> its JSON schema `parameters` ({} when none). max_calls=1 keeps only the
        first call (parallel_tool_calls=false): later blocks are dropped (not content)."""
        self._tools, self._max_calls = tools, max_calls
        self._buf = ""  # unparsed text; inside a block, the block from "<tool_call>" on
        self._pos = 0  # inside a block: how far it is parsed
        self._state: Callable[[bool], bool] = self._text  # a step: True when it moved on
        self._after_call = False  # whitespace-only text after a call is dropped
        self._events: list[ToolCallEvent] = []
        self._calls: list[ParsedToolCall] = []
        self._index = 0  # calls started
        self._has_open, self._open_text = False, ""  # finish(): a call left open, its raw block
        # the call being parsed: schema, arguments, keys emitted
        self._name, self._schema, self._args, self._keys = "", {}, {}, 0
        # the value being parsed: key (None: a repeated key, ignored), type, start in _buf,
        # leading newline (-1: not known yet), emitted up to, closing tags ruled out up to
        self._key: str | None = None
        self._kind, self._start, self._lead, self._sent, self._scan = "string", 0, -1, 0, 0

    def feed(self, text: str) -> list[ToolCallEvent]:
        """The next decoded chunk (any size) -> the events it completes."""
        self._buf += text
        self._run(final=False)
        return self._take()

    def finish(self) -> list[ToolCallEvent]:
        """End of output: flush what was held back; close the JSON of a call left open."""
        self._run(final=True)
        if self._state in (self._func, self._value):  # cut off inside a call, e.g. at max_tokens
            if self._state == self._value and self._kind == "string" and self._key is not None:
                self._arguments('"')
            self._arguments("}" if self._keys else "{}")
            self._has_open, self._open_text = True, self._buf
            self._buf, self._state = "", self._text
        return self._take()

    @property
    def tool_calls(self) -> list[ParsedToolCall]:
        """The complete calls so far."""
        return list(self._calls)

    @property
    def has_open_call(self) -> bool:
        """finish() found a call still open (its arguments JSON was closed; it is not in tool_calls)."""
        return self._has_open

    def _run(self, final: bool) -> None:
        while self._state(final):
            pass

    def _take(self) -> list[ToolCallEvent]:
        events, self._events = self._events, []
        return events

    def _arguments(self, fragment: str) -> None:
        self._events.append(ToolArgumentsDelta(self._index - 1, fragment))

    def _key_json(self) -> str:
        self._keys += 1
        return ("{" if self._keys == 1 else ", ") + _json(self._key) + ": "

    def _text(self, final: bool) -> bool:
        """Plain text, up to the next "<tool_call>"; holds back a tail that may still become one."""
        i = self._buf.find(TOOL_CALL)
        end = i if i >= 0 else len(self._buf) - (0 if final else _partial(self._buf, TOOL_CALL))
        text = self._buf[:end]
        blank = not text.strip()
        if i < 0 and blank and self._after_call and not final:
            return False  # whitespace after a call: dropped if another call or the end follows
        if text and not (blank and self._after_call):
            self._events.append(TextDelta(text))
            self._after_call = False
        self._buf = self._buf[end:]
        if i < 0:
            return False
        if self._max_calls is not None and self._index >= self._max_calls:
            self._buf, self._state = self._buf[len(TOOL_CALL) :], self._skip
        else:
            self._pos, self._state = len(TOOL_CALL), self._open
        return True

    def _skip(self, final: bool) -> bool:
        """A block past max_calls: dropped up to its "</tool_call>"."""
        i = self._buf.find(TOOL_CALL_END)
        if i < 0:
            self._buf = "" if final else self._buf[len(self._buf) - _partial(self._buf, TOOL_CALL_END) :]
            return False
        self._buf, self._state, self._after_call = self._buf[i + len(TOOL_CALL_END) :], self._text, True
        return True

    def _open(self, final: bool) -> bool:
        """After "<tool_call>": "<function=NAME>" of a known tool starts the call, else it is text."""
        rest = self._buf[len(TOOL_CALL) :]
        head = rest.lstrip()
        m = _FUNCTION.match(head)
        if m and m.group(1).strip() in self._tools:
            name = m.group(1).strip()
            self._events.append(ToolCallStart(self._index, name))
            schema = self._tools[name]
            self._name, self._schema = name, schema if isinstance(schema, Mapping) else {}
            self._args, self._keys, self._index = {}, 0, self._index + 1
            self._pos, self._state = len(self._buf) - len(head) + m.end(), self._func
            return True
        if m is None and (FUNCTION.startswith(head) or _FUNCTION_HEAD.fullmatch(head)):
            if not final:
                return False  # may still become "<function=NAME>"
            self._has_open = True
        self._events.append(TextDelta(TOOL_CALL))  # not a call: the block is plain text
        self._buf, self._state, self._after_call = rest, self._text, False
        return True

    def _func(self, final: bool) -> bool:
        """Between parameters: "<parameter=KEY>", or the end of the function; anything else is skipped."""
        rest = self._buf[self._pos :]
        s = rest.lstrip()
        self._pos += len(rest) - len(s)
        if m := _PARAMETER.match(s):
            self._start_value(m.group(1).strip(), self._pos + m.end())
            return True
        if s.startswith(FUNCTION_END) or s.startswith(TOOL_CALL_END):  # </function> may be left out
            self._arguments("}" if self._keys else "{}")
            self._calls.append(ParsedToolCall(self._name, self._args, _json(self._args)))
            self._pos += len(FUNCTION_END) if s.startswith(FUNCTION_END) else 0
            self._state = self._close
            return True
        tags = (PARAMETER, FUNCTION_END, TOOL_CALL_END)
        if not s or not final and (_PARAMETER_HEAD.fullmatch(s) or any(tag.startswith(s) for tag in tags)):
            return False  # nothing left, or a tag may still come
        skip = s.find("<", 1)
        self._pos += skip if skip > 0 else len(s)
        return True

    def _start_value(self, key: str, start: int) -> None:
        self._key = None if key in self._args else key  # a repeated key: the first value stands
        self._kind = _param_type(self._schema, key)
        self._start, self._lead, self._sent, self._scan = start, -1, 0, 0
        self._state = self._value
        if self._kind == "string" and self._key is not None:
            self._arguments(self._key_json() + '"')

    def _value(self, final: bool) -> bool:
        """A parameter's value: a string streams out as it comes, other types whole at its end."""
        v = self._buf[self._start :]
        if self._lead < 0:
            if not v and not final:
                return False
            self._lead = self._sent = 1 if v.startswith("\n") else 0
        end, resume, hold = _value_end(v, self._scan, final)
        stop = end if end >= 0 else hold
        cut = stop - 1 if stop > self._lead and v[stop - 1] == "\n" else stop  # the trailing newline
        if self._kind == "string" and self._key is not None and cut > self._sent:
            self._arguments(_json(v[self._sent : cut])[1:-1])
            self._sent = cut
        if end < 0:
            self._scan = hold
            return False
        if self._key is not None:
            value = self._args[self._key] = _convert(v[self._lead : cut], self._kind)
            if self._kind == "string":
                self._arguments('"')
            else:
                self._arguments(self._key_json() + _json(value))
        self._pos, self._state = self._start + resume, self._func
        return True

    def _close(self, final: bool) -> bool:
        """After "</function>": the "</tool_call>" that should follow."""
        rest = self._buf[self._pos :]
        s = rest.lstrip()
        if s.startswith(TOOL_CALL_END):
            rest = s[len(TOOL_CALL_END) :]
        elif not final and TOOL_CALL_END.startswith(s):
            return False
        self._buf, self._pos, self._state, self._after_call = rest, 0, self._text, True
        return True


def parse_tool_calls(
    text: str, tools: Mapping[str, Mapping[str, Any]], *, max_calls: int | None = None
) -> ParsedOutput:
    """Non-streaming: the whole output at once (the same parser, so both agree). A call left open at
    the end is not a call: its raw block stays in the content."""
    parser = ToolCallParser(tools, max_calls=max_calls)
    events = parser.feed(text) + parser.finish()
    content = "".join(e.text for e in events if isinstance(e, TextDelta)) + parser._open_text
    return ParsedOutput(content if content.strip() else None, parser.tool_calls)


def tool_schemas(openai_tools: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """OpenAI `tools` ([{"type": "function", "function": {"name", "description", "parameters"}}]) -> name ->
    parameters ({} when none)."""
    schemas = {}
    for tool in openai_tools:
        function = tool.get("function", tool)
        parameters = function.get("parameters")
        if "name" in function:
            schemas[function["name"]] = dict(parameters) if isinstance(parameters, Mapping) else {}
    return schemas
