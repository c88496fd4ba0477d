"""OpenAI's /v1/completions and /v1/chat/completions: the routes, over the gateway's one pipeline.

    body -> protocols/openai.py: request -> GenerationSpec (conversation.py)
      -> start_generation (generation.py; a refusal is a 400 here, experts unavailable a 503)
      -> events (events.py) -> protocols/openai.py Reply: SSE chunks, or one JSON body
"""

from __future__ import annotations

import time

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from nextserve.cluster.engine.contract import EngineError, SamplingDefaults
from nextserve.cluster.gateway.chat_template import ChatTemplateError
from nextserve.cluster.gateway.generation import EngineClient, Generation, reply, start_generation
from nextserve.cluster.gateway.metrics import GatewayMetrics
from nextserve.cluster.gateway.protocols.openai import (ChatCompletionRequest, CompletionRequest, Endpoint,
                                                        GenerationRequest, Reply, RequestError, generation_spec,
                                                        openai_error, parse_request, template_error)


class OpenAIApi:
    """The two generation routes over one engine, served under one model name."""

    def __init__(self, engine: EngineClient, model_name: str, metrics: GatewayMetrics,
                 defaults: SamplingDefaults) -> None:
        self.engine, self.model_name, self.metrics, self.defaults = engine, model_name, metrics, defaults

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, Endpoint.COMPLETIONS, parse_request(await request.body(), CompletionRequest))

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, Endpoint.CHAT, parse_request(await request.body(), ChatCompletionRequest))

    def check_model(self, requested: str) -> None:
        if requested != self.model_name:
            raise RequestError(404, f"The model '{requested}' does not exist; this server serves "
                               f"'{self.model_name}'.", "model", code="model_not_found")

    async def _serve(self, request: Request, endpoint: Endpoint, req: GenerationRequest) -> Response:
        self.check_model(req.model)
        spec = generation_spec(req, self.defaults)
        out = Reply.of(endpoint, self.model_name, req, spec, self.engine.tokenizer, int(time.time()))
        try:
            generation: Generation = await start_generation(self.engine, out.header.id, spec, self.metrics,
                                                            request.state.caller, endpoint=request.url.path,
                                                            model=self.model_name)
        except ChatTemplateError as e:
            raise template_error(e) from None
        except EngineError as e:
            raise openai_error(e, spec) from None
        if req.stream:
            return StreamingResponse(out.chunks(generation.events()), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        completed = await reply(generation.events(), request.is_disconnected)
        if completed is None:
            return Response(status_code=499)  # nobody reads it; the engine requests were aborted
        return JSONResponse(out.body(completed))
