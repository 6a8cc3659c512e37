"""The pages for people on the HTTP port (off with --no-ui): the digit page at / and the
API's docs at /docs.

The digit page (server/ui/) is plain HTML, CSS and JavaScript that call the KServe v2 REST
API like any other client; it needs two facts the API does not give, the model's name and
whether there are test images to offer, from /ui/config.json. With --ui-samples, a few real
test images (three of each digit) come from /ui/samples.json. /docs is Swagger UI, read
from the swagger-ui-py package's files (nothing from the network), on /openapi.json.
Everything is read once, when the app is built: a missing file fails at start-up.
"""

from __future__ import annotations

import importlib.util
import logging
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web

from mnist_serving.contract import IMAGE_SIDE, NUM_CLASSES

from ..errors import StartupError
from . import rest

logger = logging.getLogger(__name__)

PAGES = Path(__file__).resolve().parent.parent / "ui"
# The page's own files, served from memory under /ui/ (index.html is also /).
ASSETS = {
    "index.html": "text/html",
    "docs.html": "text/html",
    "app.js": "text/javascript",
    "docs.js": "text/javascript",
    "style.css": "text/css",
    "favicon.svg": "image/svg+xml",
}
SWAGGER_FILES = ("swagger-ui-bundle.js", "swagger-ui.css")
SAMPLES_PER_CLASS = 3


def routes(model_name: str, samples_path: Path | None) -> list[web.RouteDef]:
    files = {name: (PAGES / name).read_bytes() for name in ASSETS}
    samples = load_samples(samples_path) if samples_path is not None else []
    config = rest.json_bytes({"model_name": model_name, "samples": len(samples)})

    def serve(name: str) -> rest.Handler:
        body = files[name]

        async def handle(request: web.Request) -> web.Response:
            return web.Response(body=body, content_type=ASSETS[name], charset="utf-8")

        return handle

    async def serve_config(request: web.Request) -> web.Response:
        return web.Response(body=config, content_type=rest.JSON)

    table = [
        web.get("/", serve("index.html")),
        web.get("/docs", serve("docs.html")),
        web.get("/ui/config.json", serve_config),
        *(web.get(f"/ui/{name}", serve(name)) for name in ASSETS),
        *swagger_routes(),
    ]
    if samples:
        samples_body = rest.json_bytes({"samples": samples})

        async def serve_samples(request: web.Request) -> web.Response:
            return web.Response(body=samples_body, content_type=rest.JSON)

        table.append(web.get("/ui/samples.json", serve_samples))
    return table


def swagger_routes() -> list[web.RouteDef]:
    """Swagger UI's own files, from the installed package (never a CDN)."""
    # The package's __init__ imports its framework glue; only its files are wanted here.
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise StartupError("/docs needs the swagger-ui-py package: pip install swagger-ui-py")
    static = Path(next(iter(spec.submodule_search_locations))) / "static"

    def serve(path: Path) -> rest.Handler:
        if not path.is_file():
            raise StartupError(f"{path} is missing: reinstall swagger-ui-py")

        async def handle(request: web.Request) -> web.FileResponse:
            return web.FileResponse(path)

        return handle

    return [web.get(f"/docs/{name}", serve(static / name)) for name in SWAGGER_FILES]


def load_samples(path: Path) -> list[dict[str, Any]]:
    """A few test images of an .npz for the page: the first three of each digit when it
    has labels (x_test and y_test, Keras' layout), else its first thirty images."""
    if not zipfile.is_zipfile(path):
        raise StartupError(f"--ui-samples {path} is not an .npz archive")
    try:
        with np.load(path) as archive:
            if "x_test" in archive:
                images = archive["x_test"]
                labels = archive.get("y_test")
            elif len(archive.files) == 1:
                images, labels = archive[archive.files[0]], None
            else:
                raise StartupError(
                    f"--ui-samples {path}: no x_test array (Keras' MNIST layout) and not "
                    f"a single array; it holds {archive.files}"
                )
    except (OSError, ValueError) as error:
        raise StartupError(f"--ui-samples {path} is not a readable .npz: {error}") from None
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise StartupError(f"--ui-samples {path}: images are {images.shape}, not [N, 28, 28]")
    if labels is None or len(labels) != len(images):
        chosen = list(range(min(len(images), SAMPLES_PER_CLASS * NUM_CLASSES)))
        labels = None
    else:
        by_digit = [np.flatnonzero(labels == d)[:SAMPLES_PER_CLASS] for d in range(NUM_CLASSES)]
        # 0-9, then 0-9 again: the page shows them in rows of ten.
        chosen = [int(i) for row in zip(*by_digit, strict=False) for i in row]
    pixels = np.clip(images[chosen], 0, 255).astype(np.uint8)
    logger.info("ui samples", extra={"path": str(path), "count": len(chosen)})
    return [
        {
            "index": index,
            "label": None if labels is None else int(labels[index]),
            "pixels": image.ravel().tolist(),
        }
        for index, image in zip(chosen, pixels, strict=True)
    ]
