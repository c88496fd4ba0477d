"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens) over the engine: what Claude Code
and the anthropic SDK speak. Same engine, same chat template, same tool-call parser as the OpenAI API.

    body -> protocols/anthropic.py request (a 400 in Anthropic's error shape for any mistake)
      -> OpenAI-shaped messages + tools -> chat template (chat_template.py; tool_choice forces a call's
         opening as for OpenAI) -> SamplingParams (the checkpoint's defaults for unset sampling fields)
      -> start_choices (one choice) -> text -> ToolCallParser -> content blocks
      -> one `message` body, or the SSE events message_start, content_block_start / _delta / _stop ...,
         message_delta (stop_reason, usage), message_stop, with a `ping` after message_start
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from transformers import PreTrainedTokenizerBase

from nextserve.cluster.engine.contract import EngineError, ErrorCode, FinishReason, SamplingDefaults
from nextserve.cluster.gateway.chat_template import ChatPrompt, ChatTemplateError, render_chat
from nextserve.cluster.gateway.generation import Choices, EngineClient, start_choices
from nextserve.cluster.gateway.metrics import GatewayMetrics
from nextserve.cluster.gateway.protocols.anthropic import (AnthropicError, MessagesRequest, MessagesStream,
                                                           MessageUsage, chat_messages, count_tokens_response,
                                                           message_response, new_message_id,
                                                           parse_count_tokens_request, parse_messages_request,
                                                           stop_reason_for, template_tools, tool_choice)
from nextserve.cluster.gateway.tool_calls import ToolCallParser, parse_tool_calls

log = logging.getLogger(__name__)


_ANTHROPIC_PARAMS = {"stop": "stop_sequences", "prompt": "messages"}
"""The engine's field names as this API's request names them."""


def anthropic_error(e: EngineError) -> AnthropicError:
    """An engine error in Anthropic's shape: unavailability is 529 `overloaded_error` (what its SDKs retry)."""
    status = 529 if e.code is ErrorCode.UNAVAILABLE else e.code.http_status
    message = e.message if e.param is None else f"{_ANTHROPIC_PARAMS.get(e.param, e.param)}: {e.message}"
    error = AnthropicError(status, message)
    if e.retry_after_s is not None:
        error.headers = {"retry-after": str(math.ceil(e.retry_after_s))}
    return error


class AnthropicApi:
    def __init__(self, engine: EngineClient, model_name: str, metrics: GatewayMetrics,
                 defaults: SamplingDefaults) -> None:
        self.engine, self.model_name, self.metrics, self.defaults = engine, model_name, metrics, defaults

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.engine.tokenizer

    async def count_tokens(self, request: Request) -> Response:
        req = parse_count_tokens_request(await request.body())
        self._check_model(req.model)
        return JSONResponse(count_tokens_response(len(self._render(req).prompt_ids)))

    async def messages(self, request: Request) -> Response:
        req = parse_messages_request(await request.body())
        self._check_model(req.model)
        chat = self._render(req)
        params = req.sampling_params(self.defaults)
        if chat.name_token_ids:
            params = params.constrained_to(chat.name_token_ids)
        message_id = new_message_id()
        try:
            choices = await start_choices(self.engine, message_id, chat.prompt_ids, [params], self.metrics,
                                          request.state.caller)
        except EngineError as e:
            raise anthropic_error(e) from None
        if req.stream:
            return StreamingResponse(self._events(choices, chat, message_id), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        text, last = [], None
        async for _, out in choices:
            text.append(out.text)
            last = out
            if out.finish_reason is None and await request.is_disconnected():
                return Response(status_code=499)
        assert last is not None and last.finish_reason is not None
        self._check_finished(last.finish_reason)
        parsed = parse_tool_calls(chat.choice.forced_prefix + "".join(text), chat.tool_schemas,
                                  max_calls=None if chat.choice.parallel else 1)
        stop_reason = stop_reason_for(last.finish_reason, bool(parsed.tool_calls), last.stop_string)
        usage = MessageUsage.from_prompt(choices.prompt_tokens, last.completion_tokens, choices.cached_tokens)
        return JSONResponse(message_response(message_id, self.model_name, parsed, stop_reason, usage,
                                             last.stop_string if stop_reason == "stop_sequence" else None))

    async def _events(self, choices: Choices, chat: ChatPrompt, message_id: str) -> AsyncIterator[str]:
        stream = MessagesStream()
        parser = ToolCallParser(chat.tool_schemas, max_calls=None if chat.choice.parallel else 1)
        yield stream.start(message_id, self.model_name, choices.prompt_tokens - choices.cached_tokens,
                           choices.cached_tokens)
        yield stream.ping()
        pending = parser.feed(chat.choice.forced_prefix)
        try:
            async for _, out in choices:
                events = pending + (parser.feed(out.text) if out.text else [])
                pending = []
                if out.finish_reason is not None:
                    self._check_finished(out.finish_reason)
                    events += parser.finish()
                if events:
                    yield stream.events(events)
                if out.finish_reason is not None:
                    reason = stop_reason_for(out.finish_reason, stream.has_tool_calls, out.stop_string)
                    yield stream.finish(reason, out.stop_string if reason == "stop_sequence" else None,
                                        out.completion_tokens)
        except EngineError as e:  # the stream has started: the error goes in an `error` event
            error = anthropic_error(e)
            yield stream.error(error.status, error.message)
        except AnthropicError as e:
            yield stream.error(e.status, e.message)
        except Exception:
            log.exception("message %s failed while streaming", message_id)
            yield stream.error(500, "the server failed while generating this message; it was logged, retry it")

    def _render(self, req: MessagesRequest) -> ChatPrompt:
        try:
            return render_chat(self.tokenizer, chat_messages(req), template_tools(req), tool_choice(req))
        except ChatTemplateError as e:
            raise AnthropicError(400, f"{e.param}: {e.message}") from None

    @staticmethod
    def _check_finished(reason: FinishReason) -> None:
        if reason is FinishReason.ABORT:
            raise AnthropicError(529, "the server stopped this request before it finished (shutting down); retry")

    def _check_model(self, requested: str) -> None:
        if requested != self.model_name:
            raise AnthropicError(404, f"model: '{requested}' does not exist; this server serves '{self.model_name}' "
                                      f"(point ANTHROPIC_MODEL and ANTHROPIC_SMALL_FAST_MODEL at it)")
