"""cluster/deployments/output_channel.py over the real engine on the tiny model, in this process: a
gateway's streams on one channel per head get what they would get on their own calls (tokens, order,
finish, errors), a step's outputs go as one message, and one stream's slow reader, failure or
cancellation touches no other; a lost, idle or refused channel falls back to the requests' own calls.

The transport between them is `LoopbackCall`, in this process: the head's generator runs in a task of its
own (as a Serve replica runs it), every item crosses pickle (as Ray's does), `cancel()` cancels that task
(as Serve cancels the user generator). Ray's own transport is tests/cluster/test_cluster_serving.py's.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import Any, TypeVar

import pytest

from gateway_local_engine import Server, wait_until
from nextserve.cluster.deployments.output_channel import (ChannelOpen, ChannelReady, GatewayOutputChannels,
                                                          HeadOutputChannels, StreamStart)
from nextserve.cluster.gateway.admission import STREAM_BUFFER_ITEMS, idle_bounded
from nextserve.cluster.engine.contract import (EngineError, EngineRequest, EngineRequestError, EngineUnavailableError,
                                               ErrorCode, FinishReason, SamplingParams, StepOutput)

T = TypeVar("T")
_END = object()


class LoopbackCall:
    """A streaming call as Serve's handle gives it: `gen` runs in its own task, items cross pickle."""

    def __init__(self, gen: AsyncGenerator[Any, None]) -> None:
        self.items: list[Any] = []  # what the head sent, in order (unpickled copies)
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self.task = asyncio.create_task(self._run(gen))

    async def _run(self, gen: AsyncGenerator[Any, None]) -> None:
        try:
            async for item in gen:
                self.items.append(item)
                self._queue.put_nowait(pickle.dumps(item))
            self._queue.put_nowait(_END)
        except BaseException as exc:
            self._queue.put_nowait(exc)
            raise
        finally:
            await gen.aclose()

    def fail(self, exc: Exception) -> None:
        """The transport breaks: the head's generator is cancelled, the reader gets `exc`."""
        self.task.cancel()
        self._queue.put_nowait(exc)

    def __aiter__(self) -> LoopbackCall:
        return self

    async def __anext__(self) -> Any:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._queue.put_nowait(item)
            raise item
        return pickle.loads(item)

    def cancel(self) -> None:
        self.task.cancel()


class LoopbackHead:
    """A head replica's `generate` and `channel` over the shared tiny engine, with every call it served."""

    def __init__(self, server: Server, head_id: str = "head-a", idle_close_s: float = 30.0) -> None:
        self.engine = server.engine.engine
        self.head = HeadOutputChannels(head_id, idle_close_s)
        self.calls: dict[str, LoopbackCall] = {}
        self.channel_calls: list[LoopbackCall] = []

    def start_call(self, request: EngineRequest, gateway_id: str | None) -> LoopbackCall:
        call = LoopbackCall(self.head.generate(request.request_id, self.engine.generate(request), gateway_id))
        self.calls[request.request_id] = call
        return call

    def open_channel(self, request: ChannelOpen) -> LoopbackCall:
        self.channel_calls.append(LoopbackCall(self.head.channel(request)))
        return self.channel_calls[-1]

    def start_of(self, request_id: str) -> StreamStart:
        start = self.calls[request_id].items[0]
        assert isinstance(start, StreamStart)
        return start

    def batches(self) -> list[list[tuple[str, StepOutput | EngineError]]]:
        return [m for c in self.channel_calls for m in c.items if isinstance(m, list)]


def run(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(asyncio.wait_for(make(), 120))


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


def prompt(i: int) -> tuple[int, ...]:
    return tuple(10 + (7 * i + j) % 300 for j in range(3 + i % 5))


async def collect(gateway: GatewayOutputChannels, head: LoopbackHead, request: EngineRequest) -> list[StepOutput]:
    return [out async for out in gateway.generate(request, head.start_call)]


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.01)


def check_stream(outs: list[StepOutput], expected: list[int]) -> None:
    """In order: each item's completion_tokens counts every token so far; one finish, on the last item."""
    assert [t for o in outs for t in o.token_ids] == expected
    counts = [o.completion_tokens for o in outs]
    assert counts == [sum(len(o.token_ids) for o in outs[:i + 1]) for i in range(len(outs))]
    assert [o.finish_reason for o in outs] == [None] * (len(outs) - 1) + [FinishReason.LENGTH]


def test_streams_on_a_channel_get_what_their_own_calls_get_and_a_step_goes_as_one_message(server: Server) -> None:
    lengths = [5, 9, 12, 16, 7, 20, 3, 11]
    requests = [EngineRequest(f"chan-{i}", prompt(i), greedy(n)) for i, n in enumerate(lengths)]
    expected = [server.engine.reference(list(r.prompt_ids), r.params) for r in requests]

    async def main() -> tuple[LoopbackHead, list[list[StepOutput]], list[list[StepOutput]], dict[str, int]]:
        head = LoopbackHead(server)
        gateway = GatewayOutputChannels(head.open_channel)
        direct = GatewayOutputChannels(head.open_channel, is_enabled=False)
        first = await collect(gateway, head, EngineRequest("chan-first", prompt(99), greedy(4)))
        assert head.start_of("chan-first").channel_id is None and first[-1].finish_reason is FinishReason.LENGTH
        await until(lambda: gateway.num_open == 1, "the gateway opened a channel after a request on its own call")
        on_channel = await asyncio.gather(*(collect(gateway, head, r) for r in requests))
        plain = await asyncio.gather(*(collect(direct, head, EngineRequest(f"plain-{i}", r.prompt_ids, r.params))
                                       for i, r in enumerate(requests)))
        fields = head.head.heartbeat_fields()
        await gateway.close()
        return head, on_channel, plain, fields

    head, on_channel, plain, fields = run(main)
    for outs, same, want in zip(on_channel, plain, expected):
        check_stream(outs, want)
        check_stream(same, want)
    assert isinstance(head.channel_calls[0].items[0], ChannelReady)
    # on the channel, unless its first output was already its last (a loop behind the engine gets a short
    # request's tokens merged into one item: nothing is left for a channel, so the head sends none)
    starts = [head.start_of(r.request_id) for r in requests]
    assert [s.channel_id is None for s in starts] == [s.output.finish_reason is not None for s in starts]
    for r in requests:  # after StreamStart, a request's own call carried nothing
        assert len(head.calls[r.request_id].items) == 1
    batches = head.batches()
    delivered = sum(len(b) for b in batches)
    assert delivered == sum(len(o) - 1 for o in on_channel)  # every output but the first, each once
    assert len(batches) < delivered and max(len(b) for b in batches) >= 2  # steps' outputs shared messages
    assert fields == {"output_channels": 1, "channel_messages": len(batches), "channel_outputs": delivered}
    assert all(isinstance(item, StepOutput) for b in batches for _, item in b)
    for i, r in enumerate(requests):  # the plain gateway never named itself: outputs as they are, no StreamStart
        assert isinstance(head.calls[f"plain-{i}"].items[0], StepOutput)


def test_a_slow_reader_holds_only_its_own_stream(server: Server) -> None:
    slow = EngineRequest("slow-0", prompt(1), greedy(24))
    fast = [EngineRequest(f"fast-{i}", prompt(i + 2), greedy(12)) for i in range(3)]
    expected = server.engine.reference(list(slow.prompt_ids), slow.params)

    async def main() -> tuple[list[StepOutput], list[list[StepOutput]]]:
        head = LoopbackHead(server)
        gateway = GatewayOutputChannels(head.open_channel)
        await collect(gateway, head, EngineRequest("slow-warm", prompt(0), greedy(2)))
        await until(lambda: gateway.num_open == 1, "channel open")
        stream = gateway.generate(slow, head.start_call)
        got = [await anext(stream)]
        fasts = await asyncio.gather(*(collect(gateway, head, r) for r in fast))  # while slow reads nothing
        # its last output reached the gateway (the head's call ending is not enough: the channel may still
        # carry that output), so everything after the first is one merged item
        await until(lambda: gateway._buffers[slow.request_id].is_complete, "the slow request's last output arrived")
        got += [out async for out in stream]
        await gateway.close()
        return got, fasts

    got, fasts = run(main)
    assert all(f[-1].finish_reason is FinishReason.LENGTH and f[-1].completion_tokens == 12 for f in fasts)
    check_stream(got, expected)
    assert len(got) == 2  # what arrived while its reader was away was merged into one item


def test_closing_a_stream_aborts_only_its_request_and_drops_what_is_in_flight_for_it(server: Server) -> None:
    others = [EngineRequest(f"keep-{i}", prompt(i + 4), greedy(16)) for i in range(2)]
    expected = [server.engine.reference(list(r.prompt_ids), r.params) for r in others]
    engine = server.engine.engine

    async def main() -> list[list[StepOutput]]:
        head = LoopbackHead(server)
        gateway = GatewayOutputChannels(head.open_channel)
        await collect(gateway, head, EngineRequest("close-warm", prompt(0), greedy(2)))
        await until(lambda: gateway.num_open == 1, "channel open")
        kept = [asyncio.create_task(collect(gateway, head, r)) for r in others]
        leaving = gateway.generate(EngineRequest("leaves-0", prompt(3), greedy(100)), head.start_call)
        seen = [await anext(leaving), await anext(leaving)]
        assert head.start_of("leaves-0").channel_id is not None and seen[-1].finish_reason is None
        await leaving.aclose()  # the client went away
        await until(lambda: head.calls["leaves-0"].task.done(), "the head's call ended")
        assert "leaves-0" not in gateway._buffers  # what the channel still carries for it is dropped
        results = await asyncio.gather(*kept)
        await gateway.close()
        return results

    results = run(main)
    assert "leaves-0" in engine.aborted
    wait_until(lambda: engine.is_dropped("leaves-0"), "the engine freed the aborted request")
    for outs, want in zip(results, expected):
        check_stream(outs, want)


def test_a_client_that_reads_nothing_is_cut_off_by_idle_bounded_as_before(server: Server) -> None:
    """The gateway's bound on a stream (admission.py idle_bounded) over a stream on a channel: its buffer
    fills, it waits the idle timeout, closes the stream, and the head aborts the request."""
    engine = server.engine.engine

    async def main() -> tuple[list[StepOutput], EngineError]:
        head = LoopbackHead(server)
        gateway = GatewayOutputChannels(head.open_channel)
        await collect(gateway, head, EngineRequest("idle-warm", prompt(0), greedy(2)))
        await until(lambda: gateway.num_open == 1, "channel open")
        request = EngineRequest("idle-client", prompt(6), greedy(100))
        release = server.engine.faults.fail_after(12)  # the engine stalls after 12 steps: it cannot finish
        try:
            stream = idle_bounded(gateway.generate(request, head.start_call), 0.3, request.request_id)
            got = [await anext(stream)]
            await until(lambda: head.calls["idle-client"].task.done(), "the head's call ended")  # reading nothing
            assert "idle-client" in engine.aborted
        finally:  # disarmed if the abort came first, else the stalled step fails (the request was aborted)
            server.engine.faults.forwards_before_failure = None
            release.set()
        assert head.start_of("idle-client").channel_id is not None
        with pytest.raises(EngineError) as cut:
            async for out in stream:
                got.append(out)
        await gateway.close()
        return got, cut.value

    got, error = run(main)
    assert error.code is ErrorCode.CLIENT_TIMEOUT and len(got) <= 1 + STREAM_BUFFER_ITEMS
    assert got[-1].completion_tokens <= 12
    wait_until(lambda: engine.is_dropped("idle-client"), "the engine freed the request its client stopped reading")


def test_refusals_and_a_failed_step_reach_only_their_requests(server: Server) -> None:
    async def main() -> None:
        head = LoopbackHead(server)
        gateway = GatewayOutputChannels(head.open_channel)
        await collect(gateway, head, EngineRequest("fail-warm", prompt(0), greedy(2)))
        await until(lambda: gateway.num_open == 1, "channel open")
        with pytest.raises(EngineRequestError) as refused:  # refused before any output, on its own call
            await collect(gateway, head, EngineRequest("fail-bad", (1, 10**6), greedy(4)))
        assert refused.value.param == "prompt" and "outside the vocabulary" in refused.value.message
        streams = [gateway.generate(EngineRequest(f"fail-{i}", prompt(i), greedy(100)), head.start_call)
                   for i in range(2)]
        firsts = [await anext(s) for s in streams]
        assert all(f.finish_reason is None for f in firsts)
        release = server.engine.faults.fail_after(0)  # the next forward pass fails: every sequence in it
        release.set()
        for stream in streams:
            with pytest.raises(EngineError) as failed:
                async for _ in stream:
                    pass
            assert failed.value.code is ErrorCode.INTERNAL and "retry" in failed.value.message
        assert gateway.num_open == 1  # the channel carried the errors and goes on
        after = await collect(gateway, head, EngineRequest("fail-after", prompt(5), greedy(6)))
        assert head.start_of("fail-after").channel_id is not None and after[-1].completion_tokens == 6
        await gateway.close()

    run(main)


def test_a_lost_channel_fails_its_requests_and_the_next_request_streams_on_its_own_call(server: Server) -> None:
    engine = server.engine.engine

    async def main() -> None:
        head = LoopbackHead(server)
        gateway = GatewayOutputChannels(head.open_channel)
        await collect(gateway, head, EngineRequest("lost-warm", prompt(0), greedy(2)))
        await until(lambda: gateway.num_open == 1, "channel open")
        stream = gateway.generate(EngineRequest("lost-0", prompt(1), greedy(100)), head.start_call)
        await anext(stream)
        head.channel_calls[0].fail(ConnectionError("the transport broke"))
        with pytest.raises(EngineUnavailableError, match="lost"):
            async for _ in stream:
                pass
        await until(lambda: head.calls["lost-0"].task.done(), "the head's call ended")
        assert gateway.num_open == 0
        again = await collect(gateway, head, EngineRequest("lost-1", prompt(2), greedy(5)))
        assert head.start_of("lost-1").channel_id is None and again[-1].completion_tokens == 5
        await until(lambda: gateway.num_open == 1, "a new channel")
        await gateway.close()

    run(main)
    assert "lost-0" in engine.aborted
    wait_until(lambda: engine.is_dropped("lost-0"), "the engine freed the request of the lost channel")


def test_an_idle_channel_ends_and_a_refused_one_is_not_retried_at_once(server: Server) -> None:
    async def main() -> None:
        head = LoopbackHead(server)
        gateway = GatewayOutputChannels(head.open_channel)
        await collect(gateway, head, EngineRequest("idle-0", prompt(0), greedy(2)))
        await until(lambda: gateway.num_open == 1, "channel open")
        head.head.idle_close_s = 0.2  # the channel's next idle wait, after the request below used it
        await collect(gateway, head, EngineRequest("idle-1", prompt(1), greedy(3)))
        assert head.start_of("idle-1").channel_id is not None
        await until(lambda: gateway.num_open == 0, "the head ended the idle channel")
        assert head.channel_calls[0].task.done() and head.head.heartbeat_fields()["output_channels"] == 0
        await collect(gateway, head, EngineRequest("idle-2", prompt(2), greedy(2)))
        assert head.start_of("idle-2").channel_id is None
        await until(lambda: gateway.num_open == 1, "reopened")
        await gateway.close()

        other = LoopbackHead(server, head_id="head-b")  # Serve routed the channel to a replica it does not name
        misrouted = GatewayOutputChannels(other.open_channel, retry_s=60.0)
        await collect(misrouted, head, EngineRequest("refused-0", prompt(3), greedy(2)))
        await until(lambda: len(other.channel_calls) == 1 and other.channel_calls[0].task.done(), "refused")
        assert other.channel_calls[0].items == [] and misrouted.num_open == 0
        await collect(misrouted, head, EngineRequest("refused-1", prompt(4), greedy(2)))
        assert head.start_of("refused-1").channel_id is None and len(other.channel_calls) == 1  # not retried yet

    run(main)


def test_a_gateway_closing_ends_its_channel_on_the_head_at_once(server: Server) -> None:
    """What a gateway replica that Serve stops does (its deployment's `__del__`): the head's channel call ends
    now, not after `idle_close_s` (30 s here; `until` gives up after 20 s), so the head can stop."""
    async def main() -> None:
        head = LoopbackHead(server)
        gateway = GatewayOutputChannels(head.open_channel)
        await collect(gateway, head, EngineRequest("bye-0", prompt(0), greedy(2)))
        await until(lambda: gateway.num_open == 1, "channel open")
        assert head.head.heartbeat_fields()["output_channels"] == 1
        await gateway.close()
        await until(lambda: head.channel_calls[0].task.done(), "the head's channel call ended")
        assert head.head.heartbeat_fields()["output_channels"] == 0 and gateway.num_open == 0

    run(main)
