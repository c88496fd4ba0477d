"""A step's outputs for one gateway replica's streams as one message: the output channel between a
gateway replica and a head replica (plain asyncio; deployments/head.py and gateway.py carry it over Ray).

    gateway replica                                          head replica
      generate(request, gateway_id) --Serve, routed---------> HeadOutputChannels.generate
        <-- StreamStart(first output, head_id, channel_id) --   admitted: the first output (or its
                                                                EngineError) on the request's own call
      channel_id None (no channel yet): the rest of the outputs on that call, one message per step,
        and the gateway opens one: channel(ChannelOpen) -> the named head replica (prefix_router.py)
          <-- ChannelReady, then batches [(request_id, StepOutput | EngineError), ...] ----
      channel_id set: the rest on the channel, one batch per step for every stream of this gateway there,
        fanned out to each request's own buffer (GatewayOutputChannels); the request's call stays open
        (Serve's routing, ongoing-request counts and cancellation see it as before) and ends with it

Before, a head sent one message per stream per step; with a channel, one per gateway per step (the
outputs the engine flushed together are taken together; a request's outputs not yet sent merge into one).

What a client sees does not change: a request's outputs arrive in order (its first on its call, the rest
on one channel, which is FIFO; what the channel delivers before the first is buffered for it), its
EngineError ends it alone, a slow client holds only its own merged buffer (the channel never waits for
a consumer, so `idle_bounded` bounds each stream as before), and closing a stream cancels its call,
which aborts the request in its head (whatever the channel still carries for it is dropped).
A channel lost (head or gateway gone, transport failure) ends every request on it with an
EngineUnavailableError (503, retry) at both ends, as losing the head did before; a new request then
streams on its own call and opens a new channel. A head ends a channel no request has used for
`CHANNEL_IDLE_CLOSE_S` (so a draining replica's ongoing requests reach 0), and a gateway replica being
stopped ends its channels (`GatewayOutputChannels.close`, from its deployment's `__del__`); a refused channel (the
replica it was routed to is not the one named) is retried after `CHANNEL_RETRY_S`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Protocol

from nextserve.cluster.engine.contract import EngineError, EngineRequest, EngineUnavailableError, StepOutput

log = logging.getLogger(__name__)

CHANNEL_IDLE_CLOSE_S = 10.0
"""A head ends a channel that carried no request for this long: Serve counts the channel call as an
ongoing request, and a replica draining for a redeploy or a scale-down waits for those to end."""
CHANNEL_RETRY_S = 5.0
"""After a channel to a head replica was refused or never became ready, its requests stream on their own
calls for this long before the gateway tries again."""

ChannelItem = tuple[str, StepOutput | EngineError]
"""(request_id, what the request produced since its last item, or the EngineError that ends it)."""


@dataclass(frozen=True, slots=True)
class ChannelOpen:
    """The argument of a head's `channel` call: which gateway replica listens, and which head it is for."""
    gateway_id: str
    channel_id: str
    """Fresh for every open: a request names the channel its outputs go on, never an older one."""
    head_id: str
    """The head replica this channel is for (Serve's replica id); another replica refuses it."""


@dataclass(frozen=True, slots=True)
class ChannelReady:
    """A channel's first message: the head took it; requests of its gateway go on it from now on."""
    head_id: str


@dataclass(frozen=True, slots=True)
class StreamStart:
    """The first item of a request sent with a gateway id: its first output, the head replica that serves
    it, and the channel its later outputs go on (None: on this call, one item per step)."""
    output: StepOutput
    head_id: str
    channel_id: str | None


HEAD_LOST = ("the head replica serving this request was lost (its process, node or connection failed); retry it: "
             "new requests go to the remaining head replicas")
"""What a request whose head went away ends with, on its own call or on a channel (no replica id: internals)."""


def channel_lost(head_id: str) -> EngineUnavailableError:
    log.warning("the output channel from head replica %s was lost", head_id)
    return EngineUnavailableError(HEAD_LOST)


async def guarded(request_id: str, outputs: AsyncGenerator[StepOutput, None]) -> AsyncGenerator[
        StepOutput | EngineError, None]:
    """The engine's outputs, then at most one EngineError as the last item; no other exception leaves (a Ray
    error would carry the head's traceback, pid and address to the client: it is logged here instead).
    Closing this closes `outputs`, which aborts an unfinished request."""
    async with aclosing(outputs):
        try:
            async for out in outputs:
                yield out
        except EngineError as exc:
            yield exc
        except Exception:
            log.exception("request %s failed in its head", request_id)
            yield EngineError("the server failed while generating this request; it was logged, retry it")


class _HeadChannel:
    """One gateway's channel on a head: what its requests produced since the channel's last batch."""

    def __init__(self, channel_id: str) -> None:
        self.channel_id = channel_id
        self.pending: dict[str, StepOutput | EngineError] = {}
        self.attached: set[str] = set()
        """Requests whose outputs go on this channel and have not ended."""
        self.is_closed = False
        self._ready = asyncio.Event()

    def detach(self, request_id: str) -> None:
        """The request ended (or was cancelled): once none is left, the channel's idle time starts."""
        self.attached.discard(request_id)
        self._ready.set()  # a wait without a timeout (requests were attached) becomes an idle wait

    def put(self, request_id: str, item: StepOutput | EngineError) -> bool:
        """Queue `item` for the next batch (merged with the request's unsent output); False once closed."""
        if self.is_closed:
            return False
        pending = self.pending.get(request_id)
        if isinstance(pending, StepOutput) and isinstance(item, StepOutput):
            item = pending.merge(item)
        self.pending[request_id] = item
        self._ready.set()
        return True

    async def next_batch(self, idle_close_s: float) -> list[ChannelItem] | None:
        """Everything pending, once there is some; None when no request was attached for `idle_close_s`."""
        while not self.pending:
            self._ready.clear()
            if self.attached:
                await self._ready.wait()
                continue
            try:
                await asyncio.wait_for(self._ready.wait(), idle_close_s)
            except TimeoutError:
                if not self.pending and not self.attached:
                    return None
        batch, self.pending = list(self.pending.items()), {}
        return batch


class HeadOutputChannels:
    """A head replica's side: each request's stream, and one channel per gateway replica that opened one."""

    def __init__(self, head_id: str, idle_close_s: float = CHANNEL_IDLE_CLOSE_S) -> None:
        self.head_id, self.idle_close_s = head_id, idle_close_s
        self._channels: dict[str, _HeadChannel] = {}  # gateway_id -> its newest channel
        self.num_messages = 0
        """Batches sent on channels since start."""
        self.num_outputs = 0
        """Outputs (and errors) those batches carried: num_outputs / num_messages is how much steps coalesced."""

    def heartbeat_fields(self) -> dict[str, int]:
        """For the head's registry entry (`nextserve status`): channels open here, and what they carried."""
        return {"output_channels": len(self._channels), "channel_messages": self.num_messages,
                "channel_outputs": self.num_outputs}

    async def generate(self, request_id: str, outputs: AsyncGenerator[StepOutput, None],
                       gateway_id: str | None) -> AsyncGenerator[StepOutput | EngineError | StreamStart, None]:
        """One request's call. Without a gateway id: the outputs and at most one EngineError, as they come.
        With one: an EngineError (refused), or StreamStart and then the rest on the gateway's channel when
        it has one here (nothing more on this call unless the channel is lost), else on this call."""
        async with aclosing(guarded(request_id, outputs)) as items:
            first = await anext(items)
            channel = None if gateway_id is None else self._channels.get(gateway_id)
            if gateway_id is None or isinstance(first, EngineError):
                yield first
            elif channel is None or first.finish_reason is not None:
                yield StreamStart(first, self.head_id, None)
            else:
                channel.attached.add(request_id)  # before the first yield: the channel is not idle from here on
                try:
                    yield StreamStart(first, self.head_id, channel.channel_id)
                    async for item in items:
                        if not channel.put(request_id, item):  # the channel ended under this request
                            yield channel_lost(self.head_id)
                            return
                finally:
                    channel.detach(request_id)
                return
            async for item in items:
                yield item

    async def channel(self, request: ChannelOpen) -> AsyncGenerator[ChannelReady | list[ChannelItem], None]:
        """A gateway's channel: ChannelReady, then one batch per step that produced outputs for its requests,
        until the gateway cancels it or no request used it for `idle_close_s`. Refused (it ends at once)
        when it names another head replica."""
        if request.head_id != self.head_id:
            log.info("refused output channel %s of gateway %s: it names head replica %s, this is %s",
                     request.channel_id, request.gateway_id, request.head_id, self.head_id)
            return
        channel = _HeadChannel(request.channel_id)
        self._channels[request.gateway_id] = channel  # requests admitted from now on go on it
        try:
            yield ChannelReady(self.head_id)
            while (batch := await channel.next_batch(self.idle_close_s)) is not None:
                self.num_messages += 1
                self.num_outputs += len(batch)
                yield batch
        finally:
            channel.is_closed = True  # a request still attached yields channel_lost on its own call
            if self._channels.get(request.gateway_id) is channel:
                del self._channels[request.gateway_id]


class CallStream(Protocol):
    """A streaming call to a head as the gateway holds it (Serve's DeploymentResponseGenerator)."""
    def __aiter__(self) -> AsyncIterator[object]: ...
    def __anext__(self) -> Awaitable[object]: ...
    def cancel(self) -> None: ...


StartCall = Callable[[EngineRequest, str | None], CallStream]
"""Send a request to a head: `generate(request, gateway_id)` (None: no channel; plain outputs come back)."""
OpenChannel = Callable[[ChannelOpen], CallStream]
"""Open a channel: `channel(ChannelOpen)`, routed to the head replica it names."""


class _Buffer:
    """A request's outputs delivered by a channel that its consumer has not taken: merged into one item.
    Its final output or an error completes it; anything after that is dropped (a channel lost after a
    request's last output does not turn that output into an error)."""
    __slots__ = ("_pending", "_ready", "is_complete")

    def __init__(self) -> None:
        self._pending: StepOutput | BaseException | None = None
        self._ready = asyncio.Event()
        self.is_complete = False

    def put(self, item: StepOutput | BaseException) -> None:
        if self.is_complete:
            return
        if isinstance(item, StepOutput):
            self.is_complete = item.finish_reason is not None
            if isinstance(self._pending, StepOutput):
                item = self._pending.merge(item)
        else:
            self.is_complete = True  # an error replaces what is pending and ends the request
        self._pending = item
        self._ready.set()

    async def get(self) -> StepOutput:
        while (item := self._pending) is None:
            self._ready.clear()
            await self._ready.wait()
        self._pending = None
        if isinstance(item, BaseException):
            raise item
        return item


@dataclass(eq=False)
class _GatewayChannel:
    head_id: str
    channel_id: str
    buffers: set[_Buffer] = field(default_factory=set)
    """Of the requests whose outputs come on it, those not complete yet: failed if it is lost."""
    is_ready: bool = False


class GatewayOutputChannels:
    """A gateway replica's side: requests sent to heads, and one channel per head replica that serves them,
    read by one task each and fanned out to the requests' buffers by request id."""

    def __init__(self, open_channel: OpenChannel, is_enabled: bool = True, retry_s: float = CHANNEL_RETRY_S) -> None:
        self.gateway_id = uuid.uuid4().hex
        self.is_enabled, self.retry_s = is_enabled, retry_s
        self._open_channel = open_channel
        self._buffers: dict[str, _Buffer] = {}  # request_id -> buffer, from before its call starts
        self._by_head: dict[str, _GatewayChannel] = {}  # open or opening
        self._by_id: dict[str, _GatewayChannel] = {}
        self._retry_at: dict[str, float] = {}  # head_id -> monotonic time its channel may be opened again
        self._listeners: set[asyncio.Task[None]] = set()

    @property
    def num_open(self) -> int:
        """Channels this gateway holds open (ready) now."""
        return sum(c.is_ready for c in self._by_head.values())

    async def generate(self, request: EngineRequest, start_call: StartCall) -> AsyncGenerator[StepOutput, None]:
        """The request's outputs in order; its EngineError (or its call's own error, as the transport raised
        it) is raised. Closing this before the last output cancels the request's call (the head aborts it)."""
        request_id = request.request_id
        buffer = _Buffer()
        use_channel = self.is_enabled and request_id not in self._buffers  # an id not unique here: no channel
        if use_channel:
            self._buffers[request_id] = buffer  # before the call: a channel may deliver before the first output
        call = start_call(request, self.gateway_id if use_channel else None)
        is_finished, channel, watcher = False, None, None
        try:
            first = await anext(call)
            if isinstance(first, BaseException):
                raise first
            if isinstance(first, StreamStart):
                if first.channel_id is None:
                    self._open(first.head_id)
                elif (channel := self._by_id.get(first.channel_id)) is None:  # lost before this request heard
                    raise channel_lost(first.head_id)
                first = first.output
            assert isinstance(first, StepOutput), f"a head sent {type(first).__name__} as a request's first item"
            is_finished = first.finish_reason is not None
            if channel is None:  # every output on the request's own call
                if self._buffers.get(request_id) is buffer:
                    del self._buffers[request_id]
                yield first
                async for item in call:
                    if isinstance(item, BaseException):
                        raise item
                    assert isinstance(item, StepOutput), f"a head sent {type(item).__name__} on a request's call"
                    is_finished = item.finish_reason is not None
                    yield item
                return
            channel.buffers.add(buffer)
            watcher = asyncio.create_task(self._watch(call, buffer))
            yield first
            while not is_finished:
                out = await buffer.get()
                is_finished = out.finish_reason is not None
                yield out
            await watcher  # the call ends as soon as its last output went on the channel
        finally:
            if self._buffers.get(request_id) is buffer:
                del self._buffers[request_id]
            if channel is not None:
                channel.buffers.discard(buffer)
            if watcher is not None and not watcher.done():
                watcher.cancel()
            if not is_finished:
                call.cancel()  # the client left (or the request failed): the head aborts it

    @staticmethod
    async def _watch(call: CallStream, buffer: _Buffer) -> None:
        """A request on a channel: its call carries nothing more but its end, or an error (the head lost the
        channel, or the transport's own: the head replica died), which goes to the request's buffer."""
        try:
            async for item in call:
                buffer.put(item if isinstance(item, BaseException) else
                           EngineError(f"a head sent {type(item).__name__} on a call whose outputs go on a channel"))
        except Exception as exc:  # noqa: BLE001 - raised to the request's consumer
            buffer.put(exc)

    def _open(self, head_id: str) -> None:
        """Open a channel to `head_id` unless one is open or opening, or its last one was refused lately."""
        if head_id in self._by_head or self._retry_at.get(head_id, 0.0) > time.monotonic():
            return
        channel = _GatewayChannel(head_id, uuid.uuid4().hex)
        self._by_head[head_id] = self._by_id[channel.channel_id] = channel
        task = asyncio.create_task(self._listen(channel), name=f"output-channel-{head_id}")
        self._listeners.add(task)
        task.add_done_callback(self._listeners.discard)

    async def _listen(self, channel: _GatewayChannel) -> None:
        call = self._open_channel(ChannelOpen(self.gateway_id, channel.channel_id, channel.head_id))
        try:
            async for message in call:
                if isinstance(message, ChannelReady):
                    channel.is_ready = True
                    log.info("output channel %s from head replica %s is open", channel.channel_id, channel.head_id)
                    continue
                assert isinstance(message, list), f"a channel carried {type(message).__name__}"
                for request_id, item in message:
                    buffer = self._buffers.get(request_id)
                    if buffer is not None:  # else its stream was closed: dropped
                        buffer.put(item)
        except Exception as exc:  # noqa: BLE001 - its requests are failed below
            log.warning("output channel %s from head replica %s failed: %s", channel.channel_id, channel.head_id,
                        exc)
        finally:
            call.cancel()
            del self._by_id[channel.channel_id]
            if self._by_head.get(channel.head_id) is channel:
                del self._by_head[channel.head_id]
            if not channel.is_ready:  # refused (another replica took the call), or the head is gone
                self._retry_at[channel.head_id] = time.monotonic() + self.retry_s
            for buffer in channel.buffers:
                buffer.put(channel_lost(channel.head_id))
            channel.buffers.clear()

    async def close(self) -> None:
        """End every channel (their unfinished requests fail)."""
        for task in list(self._listeners):
            task.cancel()
        await asyncio.gather(*self._listeners, return_exceptions=True)
