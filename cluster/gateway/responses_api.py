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
from fastapi.responses import JSONResponse, Response, StreamingResponse

from nextserve.cluster.engine.contract import EngineError, SamplingDefaults
from nextserve.cluster.gateway.chat_template import ChatTemplateError
from nextserve.cluster.gateway.generation import EngineClient, reply, start_generation
from nextserve.cluster.gateway.metrics import GatewayMetrics
from nextserve.cluster.gateway.protocols.openai import RequestError, openai_error, template_error
from nextserve.cluster.gateway.protocols.responses import ResponseReply, generation_spec, parse_responses_request


class ResponsesApi:
    def __init__(self, engine: EngineClient, model_name: str, metrics: GatewayMetrics,
                 defaults: SamplingDefaults) -> None:
        self.engine, self.model_name, self.metrics, self.defaults = engine, model_name, metrics, defaults

    async def responses(self, request: Request) -> Response:
        req = parse_responses_request(await request.body())
        if req.model != self.model_name:
            raise RequestError(404, f"The model '{req.model}' does not exist; this server serves "
                               f"'{self.model_name}'.", "model", code="model_not_found")
        spec = generation_spec(req, self.defaults)
        out = ResponseReply.of(self.model_name, req, spec, int(time.time()))
        try:
            generation = await start_generation(self.engine, out.response_id, spec, self.metrics,
                                                request.state.caller, endpoint=request.url.path,
                                                model=self.model_name)
        except ChatTemplateError as e:
            raise template_error(e) from None
        except EngineError as e:
            raise openai_error(e, spec) from None
        if req.stream:
            return StreamingResponse(out.sse(generation.events()), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        completed = await reply(generation.events(), request.is_disconnected)
        if completed is None:
            return Response(status_code=499)  # nobody reads it; the engine request was aborted
        return JSONResponse(out.body(completed))
