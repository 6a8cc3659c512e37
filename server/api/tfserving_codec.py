"""TensorFlow Serving's view of the model, shared by its gRPC (tfserving.py) and REST
(tfserving_rest.py) bindings: signatures and their input dtypes, version pinning, version
labels. Knows neither proto nor HTTP.
"""

from __future__ import annotations

from mnist_serving.contract import SIGNATURES

from ..core import InferenceCore, VersionReport
from ..errors import InvalidInput
from ..validation import pinned_version

DEFAULT_SIGNATURE = "serving_default"  # what an empty signature_name means, as in TF Serving
# Signature name -> the core's dtype name of its images input.
SIGNATURE_DTYPES = {signature: dtype for dtype, signature in SIGNATURES.items()}


def signature_dtype(signature: object) -> str:
    """The core's dtype that `signature` (a request's signature_name) takes."""
    dtype = SIGNATURE_DTYPES.get(signature) if isinstance(signature, str) else None
    if dtype is None:
        raise InvalidInput(
            f"unknown signature_name {signature!r}; the signatures are {sorted(SIGNATURE_DTYPES)}"
        )
    return dtype


def refuse_label(label: str, what: str, instead: str) -> InvalidInput:
    """The error for a version label: this server has none (`instead` says what to send)."""
    return InvalidInput(
        f"{what} {label!r} is not supported: this server has no version labels; {instead}"
    )


def version(number: int | None, shown: str) -> int:
    """The core's version for one a request pins: 0 (the newest) when it pins none."""
    return 0 if number is None else pinned_version(number, shown)


def chosen_versions(
    core: InferenceCore, name: str, pinned: int, *, newest_only: bool
) -> list[VersionReport]:
    """The version a request pins, else the newest (newest_only) or every loaded one."""
    versions = core.chosen_versions(name, pinned)
    return versions[:1] if newest_only and not pinned else versions
