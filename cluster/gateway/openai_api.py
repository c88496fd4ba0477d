"""OpenAI's /v1/completions and /v1/chat/completions: the routes, over the gateway's one pipeline.

    body -> protocols/openai.py: request -> GenerationSpec (conversation.py)
      -> start_generation (generation.py; a refusal is a 400 here, experts unavailable a 503)
      -> events (events.py) -> protocols/openai.py Reply: SSE chunks, or one JSON body
"""

from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import Response

from nextserve.cluster.engine.contract import SamplingDefaults
from nextserve.cluster.gateway.generation import EngineClient
from nextserve.cluster.gateway.generation_route import ApiErrors, respond
from nextserve.cluster.gateway.metrics import GatewayMetrics
from nextserve.cluster.gateway.protocols.openai import (ChatCompletionRequest, CompletionRequest, Endpoint,
                                                        GenerationRequest, Reply, RequestError, generation_spec,
                                                        openai_error, parse_request, template_error)

OPENAI_ERRORS = ApiErrors(openai_error, template_error)
"""OpenAI's shape for a refusal before the response starts (the Responses API's too)."""


def check_model(requested: str, served: str) -> None:
    """An OpenAI-API request (chat, completions, responses) names the served model, or it is a 404."""
    if requested != served:
        raise RequestError(404, f"The model '{requested}' does not exist; this server serves '{served}'.", "model",
                           code="model_not_found")


class OpenAIApi:
    """The two generation routes over one engine, served under one model name."""

    def __init__(self, engine: EngineClient, model_name: str, metrics: GatewayMetrics,
                 defaults: SamplingDefaults) -> None:
        self.engine, self.model_name, self.metrics, self.defaults = engine, model_name, metrics, defaults

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, Endpoint.COMPLETIONS, parse_request(await request.body(), CompletionRequest))

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, Endpoint.CHAT, parse_request(await request.body(), ChatCompletionRequest))

    async def _serve(self, request: Request, endpoint: Endpoint, req: GenerationRequest) -> Response:
        check_model(req.model, self.model_name)
        spec = generation_spec(req, self.defaults)
        out = Reply.of(endpoint, self.model_name, req, spec, self.engine.tokenizer, int(time.time()))
        return await respond(request, self.engine, self.metrics, self.model_name, out.header.id, spec, req.stream,
                             OPENAI_ERRORS, out.chunks, out.body)
