"""The call being handled, as every layer below the APIs sees it: its priority class, its
request ID, and what the access log and the trace say of it (images, model version).

The per-call path (api/calls.py) makes one `Call` per call and makes it current for the
task that handles it; the core reads the priority from here, and a binding whose protocol
carries a priority of its own (v2's `priority` parameter) sets it here. A leaf: imports
nothing of the server but its errors.
"""

from __future__ import annotations

import itertools
import os
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any, Literal, get_args

import grpc

from .errors import InvalidInput

Priority = Literal["online", "batch"]
PRIORITIES: tuple[Priority, ...] = get_args(Priority)
ONLINE: Priority = "online"
BATCH: Priority = "batch"
# How a caller declares the class: gRPC metadata key (lower case, as gRPC requires) and
# HTTP header; v2 also takes the request parameter, with Triton's integers.
PRIORITY_METADATA = "mnist-priority"
PRIORITY_HEADER = "Mnist-Priority"
PRIORITY_PARAMETER = "priority"
OK = grpc.StatusCode.OK
# The request ID: gRPC metadata key (in the answer's trailing metadata too) and HTTP header.
REQUEST_ID_METADATA = "x-request-id"
REQUEST_ID_HEADER = "X-Request-Id"
MAX_REQUEST_ID = 128


@dataclass(slots=True)
class Call:
    """One call as the per-call path sees it."""

    api: str  # native, tfserving, v2, tfserving_rest, v2_rest
    method: str  # the RPC's name (an HTTP route counts as the RPC it stands for)
    priority: Priority = ONLINE
    code: grpc.StatusCode = OK  # the status the caller got
    request_id: str = ""  # the caller's x-request-id, or one made for it
    images: int = 0  # images the call carried (inference calls)
    model_version: int = 0  # the version that answered (inference calls)
    span: Any = None  # the call's server span, when tracing is on (server/tracing.py)
    caller: str = "anonymous"  # the API key's name (server/auth.py), the metrics' label
    limits: Any = None  # the key's per-process limits (auth.KeyLimits), when it has any


def admit_images(call: Call, count: int) -> None:
    """Charge `count` images to the caller's images/s limit (RateLimited when over it)."""
    if call.limits is not None:
        call.limits.take_images(count)


_current: ContextVar[Call | None] = ContextVar("mnist_serving_call", default=None)
_NO_CALL = Call("", "")  # what code outside any call (tests, benchmarks) sees: online


def current_call() -> Call:
    """The call the running task handles (an online call with no name outside any)."""
    return _current.get() or _NO_CALL


def enter(call: Call) -> Token[Call | None]:
    """Make `call` the running task's current call until `leave(token)`."""
    return _current.set(call)


def leave(token: Token[Call | None]) -> None:
    _current.reset(token)


def detach() -> None:
    """No current call in the running task: for a task that serves many calls (the
    batcher's), which would otherwise inherit the call that started it."""
    _current.set(None)


def declare_priority(priority: Priority) -> None:
    """The current call's class, as its request declared it (v2's parameter)."""
    call = _current.get()
    if call is not None:
        call.priority = priority


def priority_named(value: str) -> Priority:
    """The class a metadata value or header names; INVALID_ARGUMENT for anything else."""
    name = value.strip().lower()
    for priority in PRIORITIES:
        if name == priority:
            return priority
    raise InvalidInput(
        f"priority {value[:40]!r} is not a class; send {PRIORITY_METADATA} (gRPC metadata) or "
        f"{PRIORITY_HEADER} (HTTP header) as one of {list(PRIORITIES)}"
    )


def priority_numbered(value: object) -> Priority:
    """The class of v2's `priority` request parameter, Triton's convention: 0 (the default)
    and 1 are online, 2 or more batch (a class's name is taken too)."""
    if isinstance(value, str):
        return priority_named(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(
            f"parameter {PRIORITY_PARAMETER} is {value!r}; give a whole number: 0 or 1 for "
            "online, 2 or more for batch (or one of "
            f"{list(PRIORITIES)} as {PRIORITY_METADATA} / {PRIORITY_HEADER})"
        )
    return BATCH if value >= 2 else ONLINE


def request_id_of(value: object) -> str:
    """The caller's request ID when it is one (printable ASCII, 1 to 128 characters);
    otherwise, or when there is none, a new one (32 hex digits)."""
    if (
        isinstance(value, str)
        and 0 < len(value) <= MAX_REQUEST_ID
        and value.isascii()
        and value.isprintable()
    ):
        return value
    return f"{_id_prefix}{next(_id_counter):016x}"


# New IDs: 64 random bits per process, then a counter (a uuid4 costs several times more,
# on every call that brings no ID of its own). A forked child draws its own prefix.
def _new_id_source() -> None:
    global _id_prefix, _id_counter
    _id_prefix = os.urandom(8).hex()
    _id_counter = itertools.count()


_id_prefix = ""
_id_counter = itertools.count()
_new_id_source()
os.register_at_fork(after_in_child=_new_id_source)


def current_request_id() -> str:
    """The running task's request ID; "" outside any call (what the log filter reads)."""
    call = _current.get()
    return "" if call is None else call.request_id
