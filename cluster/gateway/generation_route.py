"""The one HTTP flow of a generation request, whichever API spoke: start it, turn a refusal into the API's
error, then stream its events through the API's SSE renderer or answer with the API's one body.

    route (openai_api / anthropic_api / responses_api): body -> protocols/<api>.py -> GenerationSpec + reply
      -> respond(): start_generation (generation.py)
           ChatTemplateError / EngineError -> the API's own error (raised: the app's handlers render it)
           stream: StreamingResponse(render_sse(events))            (text/event-stream, no-cache)
           else:   JSONResponse(render_body(completed)), or 499 when the client left first (aborted)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from nextserve.cluster.engine.contract import EngineError
from nextserve.cluster.gateway.chat_template import ChatTemplateError
from nextserve.cluster.gateway.conversation import GenerationSpec
from nextserve.cluster.gateway.events import Completed, Event
from nextserve.cluster.gateway.generation import EngineClient, reply, start_generation
from nextserve.cluster.gateway.metrics import GatewayMetrics


@dataclass(frozen=True, slots=True)
class ApiErrors:
    """How one API words the two refusals that come before its response starts."""
    engine: Callable[[EngineError, GenerationSpec], Exception]
    """An engine refusal or unavailability (mapped by its ErrorCode, naming the field in the API's terms)."""
    template: Callable[[ChatTemplateError], Exception]
    """A conversation the chat template refuses."""


async def respond(request: Request, engine: EngineClient, metrics: GatewayMetrics, model_name: str,
                  response_id: str, spec: GenerationSpec, stream: bool, errors: ApiErrors,
                  render_sse: Callable[[AsyncIterator[Event]], AsyncIterator[str]],
                  render_body: Callable[[Completed], Mapping[str, Any]]) -> Response:
    """Serve one generation request as its API renders it (module docstring)."""
    try:
        generation = await start_generation(engine, response_id, spec, metrics, request.state.caller,
                                            endpoint=request.url.path, model=model_name)
    except ChatTemplateError as e:
        raise errors.template(e) from None
    except EngineError as e:
        raise errors.engine(e, spec) from None
    if stream:
        return StreamingResponse(render_sse(generation.events()), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    completed = await reply(generation.events(), request.is_disconnected)
    if completed is None:
        return Response(status_code=499)  # nobody reads it; the engine requests were aborted
    return JSONResponse(render_body(completed))
