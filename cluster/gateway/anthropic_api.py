"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens): the routes, over the gateway's one
pipeline (the same as the OpenAI API's). What Claude Code and the anthropic SDK speak.

    body -> protocols/anthropic.py: request -> GenerationSpec (conversation.py)
      -> start_generation (generation.py; one choice) -> events (events.py)
      -> protocols/anthropic.py MessageReply: one `message` body, or the SSE events message_start, ping,
         content_block_start / _delta / _stop ..., message_delta (stop_reason, usage), message_stop
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from nextserve.cluster.engine.contract import SamplingDefaults
from nextserve.cluster.gateway.chat_template import ChatTemplateError
from nextserve.cluster.gateway.generation import EngineClient
from nextserve.cluster.gateway.generation_route import ApiErrors, respond
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
        return await respond(request, self.engine, self.metrics, self.model_name, out.message_id, spec, req.stream,
                             ApiErrors(anthropic_error, template_error), out.sse, out.body)

    def _check_model(self, requested: str) -> None:
        if requested != self.model_name:
            raise AnthropicError(404, f"model: '{requested}' does not exist; this server serves '{self.model_name}' "
                                      f"(point ANTHROPIC_MODEL and ANTHROPIC_SMALL_FAST_MODEL at it)")
