"""POST /v1/feedback: callers' true labels for predictions this server made (the native
API's Feedback over HTTP).

    {"labels": [{"request_id": "...", "index": 0, "label": 7}, ...]}
 -> {"accepted": n, "unknown": n, "duplicate": n, "unknown_indices": [positions in labels]}
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..core import InferenceCore
from ..errors import InvalidInput
from ..feedback import MAX_LABELS, FeedbackLabel
from . import rest

API = "native_rest"  # MnistService.Feedback over HTTP, counted as the RPC it stands for
METHOD = "Feedback"
PATH = "/v1/feedback"
FIELDS = ("request_id", "index", "label")


def routes(core: InferenceCore, binding: rest.RestBinding) -> list[web.RouteDef]:
    async def feedback(request: web.Request) -> web.Response:
        labels = parse_labels(rest.parse_json(await rest.read_body(request)))
        outcome = core.feedback(labels)
        return rest.json_response(
            {
                "accepted": outcome.accepted,
                "unknown": outcome.unknown,
                "duplicate": outcome.duplicate,
                "unknown_indices": outcome.unknown_indices,
            }
        )

    return [web.post(PATH, binding.counted(API, METHOD, feedback))]


def parse_labels(body: dict[str, Any]) -> list[FeedbackLabel]:
    extra = sorted(set(body) - {"labels"})
    if extra:
        raise InvalidInput(f"unknown field(s) {', '.join(map(repr, extra))}; send only labels")
    items = body.get("labels")
    if not isinstance(items, list):
        raise InvalidInput('the body must be {"labels": [{"request_id", "index", "label"}, ...]}')
    if len(items) > MAX_LABELS:
        raise InvalidInput(f"{len(items)} labels in one call; at most {MAX_LABELS}, split them")
    labels = []
    for position, item in enumerate(items):
        if not isinstance(item, dict):
            raise InvalidInput(f"labels[{position}] must be an object with {', '.join(FIELDS)}")
        unknown = sorted(set(item) - set(FIELDS))
        if unknown:
            raise InvalidInput(f"labels[{position}]: unknown field(s) {', '.join(unknown)}")
        request_id = item.get("request_id")
        if not isinstance(request_id, str):
            raise InvalidInput(f"labels[{position}].request_id must be a string")
        labels.append(
            FeedbackLabel(
                request_id,
                _whole(item.get("index", 0), f"labels[{position}].index"),
                _whole(item.get("label"), f"labels[{position}].label"),
            )
        )
    return labels


def _whole(value: object, what: str) -> int:
    """A JSON integer (7, or 7.0), never a boolean or a string."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{what} must be an integer, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise InvalidInput(f"{what} must be an integer, got {value!r}")
        return int(value)
    return value
