"""CUDA events for overlapping communication with compute, as in DeepEP v1 (`EventHandle`, `EventOverlap`).

Every normal-mode call runs on the Buffer's communication stream. With `async_finish=True` it returns an
`EventOverlap` holding an event recorded on that stream; the caller makes its stream wait on it before using the
outputs. On the CPU backend events are already complete and waiting on them does nothing.
"""

from __future__ import annotations

from typing import Any

import torch


class EventHandle:
    """An event recorded on `stream` (default: the current CUDA stream), or a completed no-op where CUDA is absent.

    Arguments:
        stream: a `torch.cuda.Stream` to record on, or None for the current stream.
    """

    def __init__(self, stream: torch.cuda.Stream | None = None) -> None:
        self.event: torch.cuda.Event | None = None
        if torch.cuda.is_available():
            self.event = torch.cuda.Event()
            self.event.record(stream if stream is not None else torch.cuda.current_stream())

    @classmethod
    def completed(cls) -> EventHandle:
        """Returns: a handle with no event, for work that finished synchronously (the CPU backend)."""
        handle = cls.__new__(cls)
        handle.event = None
        return handle

    def current_stream_wait(self) -> None:
        """Makes the current CUDA stream wait for the event (no-op for a completed handle)."""
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def stream_wait(self, stream: torch.cuda.Stream) -> None:
        """Makes `stream` wait for the event (no-op for a completed handle)."""
        if self.event is not None:
            stream.wait_event(self.event)


class EventOverlap:
    """A communication event plus the tensors that must stay alive until it completes.

    Arguments:
        event: an `EventHandle`, or None when the call finished in stream order (`async_finish=False`).
        extra_tensors: tensors kept alive with the event (an alternative to `record_stream` inside graphs).

    Use `event.current_stream_wait()`, or `with event: ...` to wait at the end of the block.
    """

    def __init__(self, event: EventHandle | None = None, extra_tensors: tuple[Any, ...] | None = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        """Makes the current stream wait for the event; raises RuntimeError if this overlap holds no event."""
        if self.event is None:
            raise RuntimeError(
                "EventOverlap.current_stream_wait(): no event to wait on (the call ran with async_finish=False, "
                "so its outputs are already ordered on the current stream)"
            )
        self.event.current_stream_wait()

    def __enter__(self) -> EventOverlap:
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        if self.event is not None:
            self.event.current_stream_wait()
