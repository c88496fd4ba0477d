"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens): the routes, over the gateway's one
pipeline (the same as the OpenAI API's). What Claude Code and the anthropic SDK speak.

    body -> protocols/anthropic.py: request -> GenerationSpec (conversation.py)
      -> start_generation (generation.py; one choice) -> events (events.py)
      -> protocols/anthropic.py MessageReply: one `message` body, or the SSE events message_start, ping,
         content_block_start / _delta / _stop ..., message_delta (stop_reason, usage), message_stop
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from nextserve.cluster.engine.contract import EngineError, SamplingDefaults
from nextserve.cluster.gateway.chat_template import ChatTemplateError
from nextserve.cluster.gateway.generation import EngineClient, reply, start_generation
from nextserve.cluster.gateway.metrics import GatewayMetrics
from nextserve.cluster.gateway.protocols.anthropic import (AnthropicError, MessageReply, anthropic_error,
                                                           conversation, count_tokens_response, generation_spec,
                                                           new_message_id, parse_count_tokens_request,
                                                           parse_messages_request, template_error)


class AnthropicApi:
    def __init__(self, engine: EngineClient, model_name: str, metrics: GatewayMetrics,
                 defaults: SamplingDefaults) -> None:
        self.engine, self.model_name, self.metrics, self.defaults = engine, model_name, metrics, defaults

    async def count_tokens(self, request: Request) -> Response:
        req = parse_count_tokens_request(await request.body())
        self._check_model(req.model)
        try:
            prompt = conversation(req).render(self.engine.tokenizer)
        except ChatTemplateError as e:
            raise template_error(e) from None
        return JSONResponse(count_tokens_response(len(prompt.prompt_ids)))

    async def messages(self, request: Request) -> Response:
        req = parse_messages_request(await request.body())
        self._check_model(req.model)
        spec = generation_spec(req, self.defaults)
        out = MessageReply(new_message_id(), self.model_name, spec)
        try:
            generation = await start_generation(self.engine, out.message_id, spec, self.metrics,
                                                request.state.caller, endpoint=request.url.path,
                                                model=self.model_name)
        except ChatTemplateError as e:
            raise template_error(e) from None
        except EngineError as e:
            raise anthropic_error(e, spec) from None
        if req.stream:
            return StreamingResponse(out.sse(generation.events()), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        completed = await reply(generation.events(), request.is_disconnected)
        if completed is None:
            return Response(status_code=499)  # nobody reads it; the engine requests were aborted
        return JSONResponse(out.body(completed))

    def _check_model(self, requested: str) -> None:
        if requested != self.model_name:
            raise AnthropicError(404, f"model: '{requested}' does not exist; this server serves '{self.model_name}' "
                                      f"(point ANTHROPIC_MODEL and ANTHROPIC_SMALL_FAST_MODEL at it)")
