"""An HTTP API and a search page over one index (FastAPI + uvicorn).

    POST /search               JSON {"text", "image" (base64), "image_id", "k", ...} or a
                               multipart form (the file in field ``image``): the same object
                               as ``retrieval search --json``
    GET  /items/{id}           an item's metadata
    GET  /items/{id}/image     its image (``?size=N``: a JPEG thumbnail at most N px a side)
    GET  /health, GET /stats   liveness; model, counts and index types
    GET  /                     the search page; OpenAPI docs at /docs

Every client error is a 4xx with ``{"error": "<one sentence>"}`` and the server carries on.
Images are served by item id only: the file path comes from the store, never from a client.
The index (model, FAISS, LMDB) is opened once. Searches are answered in batches by one worker
thread (`retrieval.serve.batching`): requests that arrive together share one forward pass per
modality and one batched search. Uploaded images are decoded and made the model's input in
request threads first, and item and image reads run concurrently with the searches.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import logging
import mimetypes
import threading
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi import Query as QueryParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..corpus import images, webdataset
from ..errors import EncoderError, SearchError
from ..model.runtime import FOLLOW_INDEX, RuntimeChoice
from ..model.spec import ModelSpec
from ..query.ranking import (
    DEFAULT_DEDUP,
    DEFAULT_IMAGE_WEIGHT,
    DEFAULT_K,
    DEFAULT_MIX,
    DEFAULT_OVERFETCH,
    DEFAULT_STRATEGY,
    MAX_RERANK,
    STRATEGIES,
)
from ..query.search import Query, Searcher
from ..query.search import Request as SearchJob
from .batching import Batcher
from .config import DEFAULT_HOST, DEFAULT_PORT, ServeConfig

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class SearchRequest(BaseModel):
    """The body of ``POST /search`` (multipart forms carry the same fields)."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = None
    image: str | None = Field(None, description="Base64 image bytes, or a data: URL.")
    image_id: str | None = Field(None, description="Use this indexed item's image as the query.")
    image_weight: float = Field(DEFAULT_IMAGE_WEIGHT, ge=0, le=1)
    embedding: list[float] | None = Field(
        None, description="A query vector computed elsewhere, in the index's model's space."
    )
    k: int = DEFAULT_K
    target: Literal["images", "captions"] | None = None
    strategy: Literal[STRATEGIES] | None = None  # type: ignore[valid-type]
    where: list[str] = Field(default_factory=list, description="key=value, key>=n, key=lo..hi")
    overfetch: int = Field(DEFAULT_OVERFETCH, ge=1, le=100)
    mix: float = Field(DEFAULT_MIX, ge=0, le=1)
    dedup: float | None = Field(
        None, gt=0, le=1, description="Fold results whose images are this close (cosine)."
    )
    rerank: int | None = Field(
        None, ge=1, le=MAX_RERANK, description="Re-order the top N with the re-ranker."
    )


class _Latest:
    """The searcher of the index's published version: after an add or a remove publishes a new
    one, the next request opens it (sharing the model); requests under way finish on the old."""

    def __init__(self, searcher: Searcher) -> None:
        self.searcher, self._lock = searcher, threading.Lock()

    def __call__(self) -> Searcher:
        with self._lock:
            self.searcher = self.searcher.latest()
            return self.searcher


def create_app(searcher: Searcher, config: ServeConfig | None = None) -> FastAPI:
    """The application serving ``searcher``'s index, and its later versions."""
    config = config or ServeConfig()
    current = _Latest(searcher)
    batcher = Batcher(current, config.max_batch, config.batch_wait_ms)
    app = _application(batcher)

    @app.post("/search", openapi_extra=_search_openapi())
    async def search(request: Request) -> JSONResponse:
        with batcher.arriving() as submit:
            fields, raw = await _read_query(request, config.max_upload_bytes)
            req = _validate(fields, config.max_k)
            if raw is None and req.image_id is None:
                job = _job(req, _query(current(), req, None, config.max_pixels))
            else:  # decoding must not hold up the event loop, nor the batch's encoding
                job = await run_in_threadpool(_prepared_job, current(), req, raw, config)
            try:
                future = submit(job)
            except RuntimeError as e:  # closed: the server is shutting down
                raise ApiError(503, str(e)) from None
        searcher, out = await _answer(future)
        for r in out["results"]:
            r["image_url"] = _image_url(r["id"])
            r["path"] = _shown_path(searcher, r.get("path"), config)
        if req.image_id is not None:
            out["query"] = _describe(out["query"], req.image_id)
        return JSONResponse(out)

    @app.get("/items/{item_id:path}/image")
    def item_image(
        item_id: str, size: int | None = QueryParam(None, ge=16, le=config.max_thumb)
    ) -> Response:
        return _image_response(current(), item_id, size, config.max_pixels)

    @app.get("/items/{item_id:path}")
    def item(item_id: str) -> dict[str, Any]:
        searcher = current()
        found = searcher.store.item(item_id)
        if found is None:
            raise ApiError(404, f"no item {item_id!r} in this index")
        shown = _shown_path(searcher, found.get("path"), config)
        return {"id": item_id, **found, "path": shown, "image_url": _image_url(item_id)}

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "index": current().manifest.name}

    @app.get("/stats")
    def stats() -> dict[str, Any]:
        return _stats(current(), batcher)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _application(batcher: Batcher) -> FastAPI:
    """The bare application, its error handlers, and ``batcher`` stopped when it shuts down."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        await run_in_threadpool(batcher.close)

    summary = "Search images by text & image"
    app = FastAPI(title="retrieval", version=__version__, summary=summary, lifespan=lifespan)
    app.state.batcher = batcher
    _add_error_handlers(app)
    return app


def _shown_path(searcher: Searcher, path: str | None, config: ServeConfig) -> str | None:
    """``path`` as a response shows it: relative to the corpus folder (None outside it), or
    whole with ``show_paths``."""
    if path is None or config.show_paths:
        return path
    corpus = Path(searcher.manifest.corpus)
    root = corpus if corpus.is_dir() else corpus.parent  # a folder, or a file's folder
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return None


def _image_response(searcher: Searcher, item_id: str, size: int | None, max_pixels: int):
    """An item's image: the file itself, a tar member's bytes, or a JPEG thumbnail of ``size``."""
    found = searcher.store.item(item_id)
    member = webdataset.parse_reference(found["path"]) if found else None
    path = Path(str(member)) if member else _item_path(searcher, item_id)
    if size is not None:  # images.load_image reads tar members too
        return Response(_thumbnail(path, size, max_pixels), media_type="image/jpeg")
    name = member.name if member else path.name
    media = mimetypes.guess_type(name)[0] or "application/octet-stream"
    if member is None:
        return FileResponse(path, media_type=media)
    try:  # an image inside a WebDataset shard has no file of its own to hand over
        return Response(webdataset.member_bytes(member), media_type=media)
    except (OSError, EOFError) as e:
        raise ApiError(404, f"the image of item {item_id!r} cannot be read: {e}") from None


def _job(req: SearchRequest, query: Query) -> SearchJob:
    return SearchJob(
        query, req.k, req.target, req.strategy, tuple(req.where), req.overfetch, req.mix,
        req.dedup, req.rerank,
    )  # fmt: skip


def _prepared_job(searcher: Searcher, req: SearchRequest, raw: bytes | None, config) -> SearchJob:
    """The search of a request with an image, the image decoded and made the model's input."""
    query = _query(searcher, req, raw, config.max_pixels)
    if query.image is not None:
        try:
            query = replace(query, image=searcher.prepare(query.image))
        except SearchError as e:
            raise ApiError(400, str(e)) from None
    return _job(req, query)


async def _answer(future) -> tuple[Searcher, dict[str, Any]]:
    """The batch's answer to one request: (the searcher that answered, its result)."""
    try:
        return await asyncio.wrap_future(future)
    except SearchError as e:
        raise ApiError(400, str(e)) from None
    except EncoderError as e:  # the server's model is at fault, not the request
        log.error("search failed: %s", e)
        raise ApiError(500, f"the server's model cannot encode this query: {e}") from None


def _search_openapi() -> dict[str, Any]:
    """The body schema of ``POST /search``, which reads its body itself to accept both kinds."""
    schema = SearchRequest.model_json_schema()
    form = json.loads(json.dumps(schema))
    form["properties"]["image"] = {"type": "string", "format": "binary"}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": schema},
                "multipart/form-data": {"schema": form},
            },
        },
        "responses": {"400": {"description": 'A bad query: {"error": "..."}'}},
    }


def _image_url(item_id: str) -> str:
    return f"/items/{quote(item_id, safe='/')}/image"


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _one_line(exc.errors())}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)


def _one_line(errors: list[dict[str, Any]]) -> str:
    e = errors[0]
    where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
    return f"{where}: {e.get('msg', 'invalid')}" if where else str(e.get("msg", "invalid"))


async def _read_query(request: Request, limit: int) -> tuple[dict[str, Any], bytes | None]:
    """The request's fields and the uploaded image's bytes (None when there is none)."""
    body = await _read_body(request, limit)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return await _read_form(request, body)
    if ctype not in ("application/json", ""):
        raise ApiError(415, "send application/json or multipart/form-data")
    try:
        fields = json.loads(body or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"malformed JSON: {e}") from None
    if not isinstance(fields, dict):
        raise ApiError(400, 'the JSON body must be an object such as {"text": "a dog"}')
    image = fields.pop("image", None)
    return fields, None if image is None else _b64(image)


def readable_size(n: int) -> str:
    """Bytes in the largest unit that shows them as at least 1: ``512 KB``, ``1.5 MB``."""
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request is larger than the {readable_size(limit)} limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # chunked bodies declare no length
            raise ApiError(413, f"the request is larger than the {readable_size(limit)} limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_form(request: Request, body: bytes) -> tuple[dict[str, Any], bytes | None]:
    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_part_size=len(body) + 1)
    except Exception as e:  # starlette raises its own parse errors for broken forms
        raise ApiError(400, f"malformed multipart form: {e}") from None
    fields: dict[str, Any] = {}
    raw = None
    for key in set(form.keys()):
        values = form.getlist(key)
        if key == "image":
            upload = values[0]
            raw = await upload.read() if hasattr(upload, "read") else _b64(str(upload))
        elif key == "where":
            fields["where"] = [str(v) for v in values if str(v).strip()]
        elif str(values[0]) != "":
            fields[key] = str(values[0])
    return fields, raw


def _b64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise ApiError(422, "image: must be a base64 string")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "image: not valid base64") from None


def _validate(fields: dict[str, Any], max_k: int) -> SearchRequest:
    try:
        req = SearchRequest.model_validate(fields)
    except ValidationError as e:
        raise ApiError(422, _one_line(e.errors())) from None
    if not 1 <= req.k <= max_k:
        raise ApiError(422, f"k: must be between 1 and {max_k}, not {req.k}")
    return req


def _query(searcher: Searcher, req: SearchRequest, raw: bytes | None, max_pixels: int) -> Query:
    text = req.text if req.text and req.text.strip() else None
    if raw is not None and req.image_id is not None:
        raise ApiError(400, "give an uploaded image or an image_id, not both")
    image = None
    if raw is not None:
        image = _decode_upload(raw, max_pixels)
    elif req.image_id is not None:
        image = _load(_item_path(searcher, req.image_id), max_pixels)
    if req.embedding is not None:
        if text is not None or image is not None:
            raise ApiError(400, "an embedding query stands alone: no text or image with it")
        return Query(vector=req.embedding)
    if text is None and image is None:
        raise ApiError(400, "the query is empty: give a text, an image or both, or an embedding")
    return Query(text=text, image=image, image_weight=req.image_weight)


def _decode_upload(raw: bytes, max_pixels: int) -> Image.Image:
    if not raw:
        raise ApiError(400, "the uploaded image is empty")
    try:
        return images.decode(io.BytesIO(raw), max_pixels=max_pixels, name="the upload")
    except images.BadImage as e:
        status = {"not an image": 415, "too many pixels": 413}.get(e.reason, 400)
        raise ApiError(status, f"cannot use the uploaded image: {e}") from None


def _item_path(searcher: Searcher, item_id: str) -> Path:
    found = searcher.store.item(item_id)
    if found is None:
        raise ApiError(404, f"no item {item_id!r} in this index")
    path = Path(found["path"])
    if not webdataset.backing_file(path).is_file():  # a tar member's tar, or the file itself
        raise ApiError(404, f"the image of item {item_id!r} is no longer on disk")
    return path


def _load(path: Path, max_pixels: int) -> Image.Image:
    try:
        return images.load_image(path, max_pixels=max_pixels)
    except images.BadImage as e:
        raise ApiError(404, f"the item's image cannot be read: {e}") from None


def _thumbnail(path: Path, size: int, max_pixels: int) -> bytes:
    im = _load(path, max_pixels)
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _describe(query: dict[str, Any], image_id: str) -> dict[str, Any]:
    """Name an image_id query's image by its item rather than by an in-memory placeholder."""
    terms = query.get("terms", [query])
    for t in terms:
        if t.get("image") == "<image>":
            t.pop("image")
            t["image_id"] = image_id
    return query


def _stats(searcher: Searcher, batcher: Batcher) -> dict[str, Any]:
    m, batches, cache = searcher.manifest, batcher.stats(), searcher.cache.stats()
    if m.milvus is not None:  # this thread's snapshot: searches refresh only the batch worker's
        try:
            searcher.space.refresh()
        except SearchError as e:
            raise ApiError(503, str(e)) from None
    return {
        "name": m.name,
        "model": m.model,
        "pretrained": m.pretrained,
        "dim": m.dim,
        "counts": searcher.store.counts(),
        "indexes": {k: v.factory for k, v in m.indexes.items()},
        "created": m.created,
        "updated": m.updated,
        "strategies": list(STRATEGIES),
        "default_strategy": DEFAULT_STRATEGY,
        "default_dedup": DEFAULT_DEDUP,
        "rerank": searcher.can_rerank(),
        "batching": asdict(batches),
        "cache": asdict(cache),
        "version": __version__,
    }


def serve(
    name: str,
    index_dir: str | Path | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    device: str = "auto",
    config: ServeConfig | None = None,
    model: ModelSpec | None = None,
    reranker: Path | None = None,
    runtime: RuntimeChoice = FOLLOW_INDEX,
) -> None:
    """Open index ``name`` once and serve it until interrupted (``model``, ``reranker``,
    ``runtime``: see `Searcher.open`)."""
    import uvicorn

    config = config or ServeConfig()
    searcher = Searcher.open(
        name, index_dir, model=model, device=device, reranker=reranker,
        cache_size=config.cache_size, runtime=runtime,
    )  # fmt: skip
    log.info("serving index %s on http://%s:%d", name, host, port)
    try:
        uvicorn.run(create_app(searcher, config), host=host, port=port, log_level="info")
    finally:
        searcher.close()
