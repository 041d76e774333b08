"""OpenTelemetry across the process boundary: the trace context current when a message is
sent travels with it, and is current while its handler runs in the worker.

When ``opentelemetry-api`` is installed and a span is current at ``submit()``, ``map()``,
``broadcast()``, ``put()`` or ``put_nowait()`` (of a pool, a pool host's client or a
DaskPool), the message goes as a :class:`Traced`: the message and a carrier dict filled by
the configured propagator (W3C ``traceparent`` by default). In the worker the carrier is
extracted and attached for the handler's coroutine, so that spans made in ``handle()`` are
children of the caller's span. A pool host forwards the pickled message as it is.

Costs: without ``opentelemetry-api`` nothing of this runs (``ENABLED`` is false and every
call site tests it first); with it and no context attached, one look at the current
context per message sent; a worker wraps its handler only once a traced message has
reached its process. A worker unpickles a :class:`Traced` into the bare message where
OpenTelemetry is not installed, so a worker without it gets messages as ever.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


def _nothing() -> Any:
    return None


# The current OpenTelemetry context, empty when nothing is attached: the first look at every
# message sent, so the cheapest there is (the context variable's own get, where the runtime
# context is the default one).
current_context: Callable[[], Any] = _nothing

try:
    from opentelemetry import context as _context
    from opentelemetry import propagate as _propagate
    from opentelemetry import trace as _trace
except ImportError:   # the optional extra is not installed
    ENABLED = False
else:
    ENABLED = True
    try:
        current_context = _context._RUNTIME_CONTEXT._current_context.get  # type: ignore[attr-defined]
    except AttributeError:   # pragma: no cover - another runtime context configured
        current_context = _context.get_current


__all__ = ['ENABLED', 'Traced', 'outgoing', 'outgoing_all', 'when_traced', 'wrap_handler']


class Traced:
    """A message with the trace context it was sent in."""

    __slots__ = ('carrier', 'message')

    def __init__(self, carrier: dict[str, str], message: Any) -> None:
        self.carrier = carrier
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (self.carrier, self.message)


# What to call when the first traced message of this process is unpickled: the workers'
# runners wrap their handlers then, so that a worker that never gets one pays nothing.
_when_traced: list[Callable[[], None]] = []
_seen = False


def when_traced(hook: Callable[[], None]) -> None:
    """Call ``hook`` once a traced message reaches this process (at once if one has)."""
    if _seen:
        hook()
    else:
        _when_traced.append(hook)


def _rebuild(carrier: dict[str, str], message: Any) -> Any:
    global _seen
    if not ENABLED:   # the handler gets the message as it was sent
        return message
    if not _seen:
        _seen = True
        hooks = list(_when_traced)
        _when_traced.clear()
        for hook in hooks:
            hook()
    return Traced(carrier, message)


def _carrier() -> dict[str, str] | None:
    """The current trace context as headers, or None when no span is current."""
    if not _trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _propagate.inject(carrier)
    return carrier or None


def outgoing(message: Any) -> Any:
    """``message``, with the current trace context if there is one (call only when
    ``ENABLED``)."""
    carrier = _carrier()
    return message if carrier is None else Traced(carrier, message)


def outgoing_all(messages: list[Any]) -> list[Any]:
    """The messages of a ``map()`` chunk, each with the current trace context."""
    carrier = _carrier()
    if carrier is None:
        return messages
    return [Traced(carrier, message) for message in messages]


def wrap_handler(call: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``call`` (a worker's handler), running a :class:`Traced` message's handler in its
    trace context."""

    def handler(message: Any) -> Any:
        if type(message) is not Traced:
            return call(message)
        return _in_context(message.carrier, call, message.message)

    return handler


async def _in_context(carrier: dict[str, str], call: Callable[[Any], Any],
                      message: Any) -> Any:
    # A handler's coroutine runs in a context of its own (a copy, as a Task's): what is
    # attached here is current for this handler only, and goes with it. (No detach: a
    # coroutine that suspends continues in its Task's copy of the context, where the
    # token of this attach does not belong.)
    _context.attach(_propagate.extract(carrier))
    result = call(message)
    if inspect.isawaitable(result):
        result = await result
    return result
