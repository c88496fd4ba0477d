"""OpenAI's Responses API (/v1/responses): the route, over the gateway's one pipeline (the same as chat
completions' and Anthropic Messages'). What Codex CLI and the openai SDK's `client.responses` speak.

    body -> protocols/responses.py: request -> GenerationSpec (conversation.py)
      -> start_generation (generation.py; one choice) -> events (events.py)
      -> protocols/responses.py ResponseReply: one `response` object, or the SSE events response.created,
         response.in_progress, output items ..., response.completed / response.incomplete / response.failed
"""

from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import Response

from nextserve.cluster.engine.contract import SamplingDefaults
from nextserve.cluster.gateway.generation import EngineClient
from nextserve.cluster.gateway.generation_route import respond
from nextserve.cluster.gateway.metrics import GatewayMetrics
from nextserve.cluster.gateway.openai_api import OPENAI_ERRORS, check_model
from nextserve.cluster.gateway.protocols.responses import ResponseReply, generation_spec, parse_responses_request


class ResponsesApi:
    def __init__(self, engine: EngineClient, model_name: str, metrics: GatewayMetrics,
                 defaults: SamplingDefaults) -> None:
        self.engine, self.model_name, self.metrics, self.defaults = engine, model_name, metrics, defaults

    async def responses(self, request: Request) -> Response:
        req = parse_responses_request(await request.body())
        check_model(req.model, self.model_name)
        spec = generation_spec(req, self.defaults)
        out = ResponseReply.of(self.model_name, req, spec, int(time.time()))
        return await respond(request, self.engine, self.metrics, self.model_name, out.response_id, spec, req.stream,
                             OPENAI_ERRORS, out.sse, out.body)
