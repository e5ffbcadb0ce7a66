"""The HTTP service: routes, error shapes and request metrics, over the engine and the helpers.

    GET  /                     the search page (static/; no external resources)
    GET  /api/search?q=&k=     text -> images (index=texts: text -> captions)
    POST /api/search/image     image upload -> images (index=texts: image -> captions);
                               with text=..., the image refined by those words (fusion=, weights=)
    GET  /file/{id}            the original image, if it may be served (files.py)
    GET  /thumb/{id}           its thumbnail, made once and cached (thumbnails.py)
    GET  /health, /healthz     liveness and what is loaded; 503 when searches cannot be answered
    GET  /metrics              Prometheus text format

/api, /file and /thumb need the API key when one is configured; the page, /health and
/metrics do not (see docs/serving.md). Every refusal is JSON {"error": "one sentence"} with a
4xx status; a 500 means a bug.
"""

from __future__ import annotations

import logging
import mimetypes
import os
import re
import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from urllib.parse import quote

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import IndexDamagedError, MMRetrieveError
from .auth import check_key
from .config import ServeConfig
from .engine import IMAGES, TEXTS, EngineBusy, EngineUnavailable, SearchEngine
from .files import Catalog, open_servable
from .metrics import CONTENT_TYPE, ServiceMetrics
from .problems import RequestProblem
from .thumbnails import ThumbnailCache
from .uploads import decode_upload, read_upload

log = logging.getLogger(__name__)

STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8",
          "favicon.svg": "image/svg+xml"}
# The page loads only its own script, style and images (thumbnails, and blob: for the upload preview).
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; object-src 'none'; "
                                           "base-uri 'none'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
CHUNK = 1 << 16


def create_app(config: ServeConfig) -> FastAPI:
    """Load the model and indexes (errors are raised here, before any port is opened) and build the app."""
    metrics = ServiceMetrics()
    engine = SearchEngine(config, metrics)
    try:
        catalog = Catalog(config.index_dir, engine.databases[IMAGES], config.roots, engine.readers[IMAGES].manifest)
    except Exception:
        engine.close()
        raise

    def follow(name: str, database: Path, manifest: dict) -> None:
        if name == IMAGES:
            catalog.follow(database, manifest)

    engine.on_change = follow
    follow(IMAGES, engine.databases[IMAGES], engine.readers[IMAGES].manifest)  # had it moved meanwhile
    thumbs = ThumbnailCache(config.thumb_cache, config.thumb_size, config.max_pixels)
    thumb_slots = anyio.CapacityLimiter(config.thumb_workers)  # full-size decodes at once
    decode_slots = anyio.CapacityLimiter(config.thumb_workers)
    page = {name: resources.files(__package__).joinpath("static", name).read_bytes()
            for name in ("index.html", *STATIC)}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.close()
        catalog.close()

    # No /docs: Swagger UI would load scripts from a CDN. /openapi.json stays.
    app = FastAPI(title="mmretrieve", version=__version__, docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.config = engine, metrics, config

    def require_key(request: Request) -> None:
        check_key(config.api_key, request.headers, request.cookies)

    keyed = [Depends(require_key)]

    # -- errors ------------------------------------------------------------------------------
    @app.exception_handler(RequestProblem)
    async def _problem(request: Request, exc: RequestProblem):
        if exc.status in (413, 415):
            metrics.rejected.inc({413: "too_large", 415: "not_an_image"}[exc.status])
        return JSONResponse({"error": exc.message}, exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())[1:]) or "request"
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid value')}"}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = {404: "no such page", 405: "method not allowed here"}.get(exc.status_code, str(exc.detail))
        return JSONResponse({"error": message}, exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(EngineUnavailable)
    async def _unavailable(request: Request, exc: EngineUnavailable):
        if isinstance(exc, EngineBusy):
            metrics.rejected.inc("busy")
            return JSONResponse({"error": str(exc)}, 503, headers={"Retry-After": "1"})
        return JSONResponse({"error": str(exc)}, 503)

    @app.exception_handler(IndexDamagedError)
    async def _damaged(request: Request, exc: IndexDamagedError):
        # The operator's problem, not the client's: the log has the folder and the command.
        log.error("%s", exc)
        return JSONResponse({"error": "the index is damaged; the server's operator must rebuild it "
                                      "(the server log says how)"}, 503)

    @app.exception_handler(MMRetrieveError)
    async def _input(request: Request, exc: MMRetrieveError):
        return JSONResponse({"error": str(exc)}, 400)

    app.add_middleware(ObserveRequests, metrics=metrics)

    # -- the page ----------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index_page():
        return Response(page["index.html"], media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in STATIC:
            raise RequestProblem(404, "no such page")
        return Response(page[name], media_type=STATIC[name],
                        headers={**PAGE_HEADERS, "Cache-Control": "public, max-age=300"})

    # -- health and metrics ------------------------------------------------------------------
    @app.get("/health")
    @app.get("/healthz", include_in_schema=False)
    async def health():
        problem = engine.problem or (None if engine.alive else "the search engine has stopped")
        # Open without a key, so no filesystem paths: the model by name, never its folder.
        body = {"status": "unavailable" if problem else "ok", "version": __version__,
                "model": {"name": public_model_name(engine.embedder.ref),
                          "fingerprint": engine.embedder.fingerprint[:12],
                          "embed_dim": int(engine.embedder.embed_dim), "runtime": engine.embedder.runtime},
                "indexes": {name: {k: status.get(k) for k in ("generation", "items", "index_type")}
                            for name, status in engine.status.items()}}
        if problem:
            body["error"] = problem
        return JSONResponse(body, 503 if problem else 200)

    @app.get("/metrics", include_in_schema=False)
    async def metrics_page():
        return Response(metrics.registry.render(), media_type=CONTENT_TYPE)

    # -- search ------------------------------------------------------------------------------
    def target_of(index: str) -> str:
        if index not in (IMAGES, TEXTS):
            raise RequestProblem(422, "index must be `images` or `texts`")
        if index not in engine.readers:
            raise RequestProblem(404, "this server has no caption index; start it with --text-index-dir")
        return index

    def check_k(k: int) -> None:
        if not 1 <= k <= config.max_k:
            raise RequestProblem(422, f"k must be between 1 and {config.max_k}")

    @app.get("/api/search", dependencies=keyed)
    async def search(request: Request, q: str | None = None, k: int = 10, min_score: float | None = None,
                     index: str = IMAGES):
        """Text query: the images (or, with index=texts, the captions) closest to `q`."""
        target, started = target_of(index), time.perf_counter()
        check_k(k)
        q = check_text(q, "q")
        hits = await engine.search_text(q, target, k, min_score)
        return await results(request, hits, target, started, query=q)

    def check_text(value: str | None, name: str) -> str:
        if value is None or not value.strip():
            raise RequestProblem(422, f"the query {name} must not be empty")
        if len(value) > config.max_query_chars:
            raise RequestProblem(422, f"the query is longer than {config.max_query_chars} characters")
        return value.strip()

    @app.post("/api/search/image", dependencies=keyed, openapi_extra=UPLOAD_SCHEMA)
    async def search_image(request: Request, k: int = 10, min_score: float | None = None, index: str = IMAGES,
                           text: str | None = None, fusion: str | None = None, weights: str | None = None):
        """Image query (multipart field `image`, or the raw body): the closest images or captions.
        With `text`, the image and the words are fused into one query (`fusion`, default mean;
        `weights` text,image for late and mean)."""
        target, started = target_of(index), time.perf_counter()
        check_k(k)
        strategy = None
        if text is not None:
            text = check_text(text, "text")
            # Resolved off the event loop: a trained head is read from disk (once).
            strategy = await anyio.to_thread.run_sync(engine.fusion, fusion or "mean", weights)
        elif fusion is not None or weights is not None:
            raise RequestProblem(422, "fusion and weights refine an image with words; add text=...")
        data, name = await read_upload(request, config.max_upload_bytes)

        def prepare():
            return engine.image_preprocessor.transform(decode_upload(data, name, config.max_pixels))

        pixels = await anyio.to_thread.run_sync(prepare, limiter=decode_slots)
        if strategy is None:
            hits = await engine.search_pixels(pixels, target, k, min_score)
            return await results(request, hits, target, started, upload=name)
        hits = await engine.search_fused(pixels, text, strategy, target, k, min_score)
        return await results(request, hits, target, started, upload=name, text=text, fusion=strategy.name)

    async def results(request: Request, hits: list, target: str, started: float, **about) -> dict:
        prefix = request.scope.get("root_path", "").rstrip("/")
        rows = [hit.as_dict() for hit in hits]
        if target == IMAGES:
            ids = {row["path"]: row["id"] for row in rows}
        else:  # a caption links to its image when that image is in the image index
            ids = await anyio.to_thread.run_sync(catalog.ids_for_paths, sorted({row["path"] for row in rows}))
        for row in rows:
            if row["path"] in ids:
                row["thumbnail_url"] = f"{prefix}/thumb/{ids[row['path']]}"
                row["file_url"] = f"{prefix}/file/{ids[row['path']]}"
        status = engine.status.get(target, {})
        return {**about, "index": target, "generation": status.get("generation"),
                "took_ms": round((time.perf_counter() - started) * 1000, 2), "results": rows}

    # -- files -------------------------------------------------------------------------------
    @app.get("/file/{item_id:path}", dependencies=keyed)
    async def original(item_id: str):
        def open_file():
            entry = catalog.entry(item_id)
            handle, info = open_servable(entry.path, catalog.roots())
            return entry, handle, info

        entry, handle, info = await anyio.to_thread.run_sync(open_file)
        name = Path(entry.path).name
        headers = {"Content-Length": str(info.st_size), "X-Content-Type-Options": "nosniff",
                   "Cache-Control": "private, max-age=3600",
                   "Content-Disposition": f"inline; filename*=UTF-8''{quote(name)}"}
        media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        return StreamingResponse(_chunks(handle), media_type=media_type, headers=headers)

    @app.get("/thumb/{item_id:path}", dependencies=keyed)
    async def thumbnail(request: Request, item_id: str):
        def locate():
            entry = catalog.entry(item_id)
            handle, info = open_servable(entry.path, catalog.roots())
            key = thumbs.key(entry.sha256 or entry.path, info)
            return handle, key, thumbs.cached(key)

        handle, key, path = await anyio.to_thread.run_sync(locate)
        try:
            headers = {"ETag": f'"{key}"', "Cache-Control": "private, max-age=86400",
                       "X-Content-Type-Options": "nosniff"}
            if request.headers.get("if-none-match") == f'"{key}"':
                return Response(status_code=304, headers=headers)
            metrics.thumbnails.inc("cached" if path else "made")
            if path is None:
                path = await anyio.to_thread.run_sync(thumbs.make, key, handle, limiter=thumb_slots)
        finally:
            handle.close()
        return FileResponse(path, media_type="image/jpeg", headers=headers)

    return app


def public_model_name(ref: str) -> str:
    """A model as /health may show it: a registered name (`default`, `hf-hub:org/name`) as it
    is, a model folder (`/srv/models/best`, `local-dir:/srv/models/best`) by its last part."""
    prefix, _, rest = str(ref).partition(":") if re.match(r"^[a-z][a-z0-9-]+:", str(ref)) else ("", "", str(ref))
    if os.path.isabs(rest) or os.path.exists(rest):
        rest = Path(rest).resolve().name or "model"
    return f"{prefix}:{rest}" if prefix else rest


class ObserveRequests:
    """ASGI middleware: counts and times every request, labelled by its route template."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        self.metrics.in_flight.add(1)
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.in_flight.add(-1)
            route = scope.get("route")  # set by the router on this same scope once a route matched
            label = getattr(route, "path", "unmatched")
            self.metrics.requests.inc(label, scope["method"], str(status[0]))
            self.metrics.latency.observe(time.perf_counter() - started, label)


def _chunks(handle):
    """The opened file in pieces (iterated in a worker thread by StreamingResponse), then closed."""
    try:
        while chunk := handle.read(CHUNK):
            yield chunk
    finally:
        handle.close()


UPLOAD_SCHEMA = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"],
                                       "properties": {"image": {"type": "string", "format": "binary"}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}}}}}
