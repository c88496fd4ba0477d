"""OpenAI's /v1/completions and /v1/chat/completions over the engine, as JSON or SSE.

    body -> protocols/openai.py request (a 400 naming the field for any mistake)
      -> prompt ids: the prompt's text or ids, or the chat template with tools (chat_template.py)
      -> SamplingParams per choice (the checkpoint's defaults for unset sampling fields, logprobs, the
         tool-name constraint of tool_choice "required")
      -> start_choices (n engine requests; a refusal is still a 400 here, experts unavailable a 503)
      -> per choice: text -> ToolCallParser when tools are parsed -> content / tool_calls
      -> one JSON body, or SSE chunks (a choice's first carries the role) ending in `data: [DONE]`
"""

from __future__ import annotations

import logging
import math
import time
import uuid
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from transformers import PreTrainedTokenizerBase

from nextserve.cluster.engine.contract import (EngineError, ErrorCode, FinishReason, SamplingDefaults, StepOutput,
                                               TokenLogprobs)
from nextserve.cluster.gateway.chat_template import ChatPrompt, ChatTemplateError, render_chat
from nextserve.cluster.gateway.generation import Choices, EngineClient, choice_params, start_choices
from nextserve.cluster.gateway.metrics import GatewayMetrics
from nextserve.cluster.gateway.protocols.openai import (SERVER_ERROR, SSE_DONE, ChatCompletionRequest, CompletionRequest,
                                                        Endpoint, GenerationRequest, RequestError, ResponseHeader,
                                                        Usage, chat_logprobs, choice_body, chunk_body,
                                                        completion_logprobs, error_body, parse_request, response_body,
                                                        sse, usage_chunk_body)
from nextserve.cluster.gateway.tenants import Caller
from nextserve.cluster.gateway.tool_calls import (ParsedToolCall, TextDelta, ToolArgumentsDelta, ToolCallEvent,
                                                  ToolCallParser, ToolCallStart, parse_tool_calls)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Job:
    header: ResponseHeader
    request: GenerationRequest
    prompt_ids: list[int]
    chat: ChatPrompt | None
    """Chat requests: the rendered prompt with its tools and tool choice."""


_OPENAI_CODES = {ErrorCode.INVALID_REQUEST: ("invalid_request_error", "invalid_value"),
                 ErrorCode.CONTEXT_LENGTH_EXCEEDED: ("invalid_request_error", "context_length_exceeded"),
                 ErrorCode.UNAVAILABLE: ("service_unavailable", "service_unavailable"),
                 ErrorCode.INTERNAL: (SERVER_ERROR, "internal_error"),
                 ErrorCode.OVERLOADED: ("requests", "rate_limit_exceeded")}
"""The engine's error codes as OpenAI's error `type` and `code`."""


def openai_error(e: EngineError, request: GenerationRequest) -> RequestError:
    """An engine error in OpenAI's shape: its status from the code, the engine's field in the request's terms."""
    param = None if e.param is None else {"prompt": request.prompt_param,
                                          "max_tokens": request.max_tokens_request()[1]}.get(e.param, e.param)
    kind, code = _OPENAI_CODES[e.code]
    error = RequestError(e.code.http_status, e.message, param, type=kind, code=code)
    if e.retry_after_s is not None:
        error.headers = {"Retry-After": str(math.ceil(e.retry_after_s))}
    return error


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ChoiceState:
    """One choice as it streams: its text through the tool-call parser (when tools are parsed)."""
    index: int
    parser: ToolCallParser | None
    call_ids: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    num_chars: int = 0
    """Characters of `text` so far (completions report each token's text offset)."""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    is_first: bool = True
    pending: list[ToolCallEvent] = field(default_factory=list)
    """Events of a forced call opening, sent with the first output."""

    @classmethod
    def for_job(cls, index: int, job: Job) -> ChoiceState:
        chat = job.chat
        if chat is None or not chat.tool_schemas:
            return cls(index, None)
        parser = ToolCallParser(chat.tool_schemas, max_calls=None if chat.choice.parallel else 1)
        state = cls(index, parser)
        state.pending = parser.feed(chat.choice.forced_prefix)  # a forced opening streams like a generated one
        return state

    def on_output(self, out: StepOutput) -> list[ToolCallEvent]:
        """The events this output adds (all text when no tools are parsed)."""
        self.text.append(out.text)
        self.num_chars += len(out.text)
        self.logprobs += out.logprobs or []
        self.completion_tokens = out.completion_tokens
        events, self.pending = self.pending, []
        if self.parser is None:
            events += [TextDelta(out.text)] if out.text else []
        else:
            events += self.parser.feed(out.text) if out.text else []
        if out.finish_reason is not None:
            events += self.parser.finish() if self.parser is not None else []
            self.finish_reason = self._finish_reason(out.finish_reason)
        return events

    def _finish_reason(self, reason: FinishReason) -> str:
        if reason is FinishReason.STOP and self.parser is not None and self.parser.tool_calls:
            return "tool_calls"
        return reason.value

    def delta(self, event: ToolCallEvent) -> dict[str, Any]:
        if isinstance(event, TextDelta):
            return {"content": event.text}
        if isinstance(event, ToolCallStart):
            self.call_ids.append(new_call_id())
            return {"tool_calls": [{"index": event.index, "id": self.call_ids[event.index], "type": "function",
                                    "function": {"name": event.name, "arguments": ""}}]}
        assert isinstance(event, ToolArgumentsDelta)
        return {"tool_calls": [{"index": event.index, "function": {"arguments": event.fragment}}]}


def tool_call_bodies(calls: list[ParsedToolCall]) -> list[dict[str, Any]]:
    return [{"id": new_call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments_json}}
            for c in calls]


class OpenAIApi:
    """The two generation routes over one engine, served under one model name."""

    def __init__(self, engine: EngineClient, model_name: str, metrics: GatewayMetrics,
                 defaults: SamplingDefaults) -> None:
        self.engine, self.model_name, self.metrics, self.defaults = engine, model_name, metrics, defaults

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.engine.tokenizer

    async def completions(self, request: Request) -> Response:
        req = parse_request(await request.body(), CompletionRequest)
        self.check_model(req.model)
        prompt = req.prompt
        ids = self.tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else prompt
        return await self._respond(request, self._job(Endpoint.COMPLETIONS, req, ids, None))

    async def chat_completions(self, request: Request) -> Response:
        req = parse_request(await request.body(), ChatCompletionRequest)
        self.check_model(req.model)
        try:
            chat = render_chat(self.tokenizer, [m.as_template_input() for m in req.messages], req.template_tools(),
                               req.tool_choice_spec())
        except ChatTemplateError as e:
            raise RequestError(400, e.message, e.param) from None
        return await self._respond(request, self._job(Endpoint.CHAT, req, chat.prompt_ids, chat))

    def check_model(self, requested: str) -> None:
        if requested != self.model_name:
            raise RequestError(404, f"The model '{requested}' does not exist; this server serves "
                               f"'{self.model_name}'.", "model", code="model_not_found")

    def _job(self, endpoint: Endpoint, req: GenerationRequest, prompt_ids: list[int], chat: ChatPrompt | None) -> Job:
        header = ResponseHeader(endpoint, f"{endpoint.id_prefix}-{uuid.uuid4().hex}", int(time.time()), self.model_name)
        return Job(header, req, prompt_ids, chat)

    async def _start(self, job: Job, caller: Caller) -> Choices:
        params = job.request.sampling_params(self.defaults)
        if job.chat is not None and job.chat.name_token_ids:
            params = params.constrained_to(job.chat.name_token_ids)
        try:
            return await start_choices(self.engine, job.header.id, job.prompt_ids, choice_params(params, job.request.n),
                                       self.metrics, dataclasses.replace(caller, cache_salt=job.request.cache_salt))
        except EngineError as e:
            raise openai_error(e, job.request) from None

    async def _respond(self, request: Request, job: Job) -> Response:
        choices = await self._start(job, request.state.caller)
        if job.request.stream:
            return StreamingResponse(self._events(choices, job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        states = [ChoiceState(i, None) for i in range(choices.n)]
        async for i, out in choices:
            states[i].on_output(out)
            if out.finish_reason is None and await request.is_disconnected():
                return Response(status_code=499)  # nobody reads it; leaving the loop aborts the engine requests
        usage = Usage(choices.prompt_tokens, sum(s.completion_tokens for s in states), choices.cached_tokens)
        return JSONResponse(response_body(job.header, [self._choice_body(job, s) for s in states], usage))

    def _choice_body(self, job: Job, state: ChoiceState) -> dict[str, Any]:
        text, logprobs, reason = "".join(state.text), self._logprobs(job, state.logprobs), state.finish_reason
        chat = job.chat
        if chat is None or not chat.tool_schemas:
            return choice_body(job.header.endpoint, state.index, text, None, reason, logprobs)
        parsed = parse_tool_calls(chat.choice.forced_prefix + text, chat.tool_schemas,
                                  max_calls=None if chat.choice.parallel else 1)
        if parsed.tool_calls and reason == "stop":
            reason = "tool_calls"
        return choice_body(job.header.endpoint, state.index, parsed.content, tool_call_bodies(parsed.tool_calls),
                           reason, logprobs)

    def _logprobs(self, job: Job, entries: list[TokenLogprobs], text_offset: int = 0) -> dict[str, Any] | None:
        """The choice's logprobs body for these tokens; `text_offset`: characters of this choice's text before
        them (completions report each token's offset)."""
        req = job.request
        if isinstance(req, ChatCompletionRequest):
            return chat_logprobs(entries, self.tokenizer) if req.logprobs else None
        assert isinstance(req, CompletionRequest)
        return completion_logprobs(entries, self.tokenizer, text_offset) if req.logprobs is not None else None

    async def _events(self, choices: Choices, job: Job) -> AsyncIterator[str]:
        """SSE: per choice a first chunk (a chat one carries the role), deltas, a finish chunk; then usage
        (stream_options.include_usage) and [DONE]."""
        h, include_usage = job.header, job.request.include_usage
        states = [ChoiceState.for_job(i, job) for i in range(choices.n)]
        try:
            async for i, out in choices:
                state = states[i]
                before, offset = len(state.logprobs), state.num_chars
                events = state.on_output(out)
                logprobs = self._logprobs(job, state.logprobs[before:], offset)
                deltas = [state.delta(e) for e in events] or ([{"content": ""}] if state.is_first or logprobs else [])
                for k, delta in enumerate(deltas):
                    yield sse(chunk_body(h, i, delta, None, state.is_first, include_usage,
                                         logprobs if k == len(deltas) - 1 else None))
                    state.is_first = False
                if state.finish_reason is not None:
                    yield sse(chunk_body(h, i, {}, state.finish_reason, False, include_usage, None))
        except EngineError as e:  # the stream has started: the error goes in an event, in OpenAI's shape
            yield sse(openai_error(e, job.request).body())
            yield SSE_DONE
            return
        except Exception:
            log.exception("request %s failed while streaming", h.id)
            yield sse(error_body("the server failed while generating this response; it was logged, retry it",
                                 SERVER_ERROR))
            yield SSE_DONE
            return
        if include_usage:
            yield sse(usage_chunk_body(h, Usage(choices.prompt_tokens, sum(s.completion_tokens for s in states),
                                                choices.cached_tokens)))
        yield SSE_DONE
