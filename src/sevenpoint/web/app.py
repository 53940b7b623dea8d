"""The web page and JSON API (FastAPI): one page, `POST /api/predict`, `POST /api/report`, `GET /health`.

`POST /api/predict` takes multipart fields derm, clinic (files), sex, location, elevation and, to
correct a criterion, its name with the clinician's value (e.g. BWV=ABS): the score, the rule and the
(stacked) diagnosis follow; an unknown criterion or value is a 422 naming it. `POST /api/report`
takes the same fields and answers with the one-page case report (HTML, images embedded).

Uploads stay in memory (never written to disk, never logged); bodies over the limit are
refused from their Content-Length before being read, and while streaming otherwise.
Predictions run in one worker thread behind a bounded queue (requests beyond it get 503); requests
that arrive together share a forward pass (micro-batches, web/batching.py).
Every response carries security headers (a Content-Security-Policy without inline script,
nosniff, no framing); with a token, every /api call must present it (constant-time compare);
reading a body and running a prediction each have a time limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import ipaddress
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.formparsers import MultiPartParser

from ..data.images import open_rgb
from .batching import MicroBatcher
from ..infer.case_report import render_report
from ..infer.predict import Prediction, Predictor, PredictError
from ..schema import CRITERIA, META_FIELDS
from ..infer.viz import jpeg_data_url, overlay_attention

STATIC = Path(__file__).parent / "static"
ALLOWED_TYPES = {"JPEG", "PNG", "BMP", "TIFF", "WEBP"}
SECURITY_HEADERS = {
    # scripts only from our own /app.js; inline style attributes draw the probability bars
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; "
                               "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def is_loopback(host: str) -> bool:
    """Whether binding to `host` keeps the server reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: may resolve to anything
        return False


class UploadError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _check_image(name: str, data: bytes, max_pixels: int):
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise UploadError(400, f"{name}: empty file")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            fmt = probe.format
            w, h = probe.size
    except UnidentifiedImageError:
        raise UploadError(415, f"{name}: not an image (allowed: {', '.join(sorted(ALLOWED_TYPES))})") from None
    except Image.DecompressionBombError:
        raise UploadError(413, f"{name}: too many pixels (limit {max_pixels})") from None
    except (OSError, ValueError, SyntaxError) as exc:  # e.g. a JPEG cut inside its header
        raise UploadError(400, f"{name}: cannot decode ({exc})") from None
    if fmt not in ALLOWED_TYPES:
        raise UploadError(415, f"{name}: {fmt} images are not accepted (allowed: {', '.join(sorted(ALLOWED_TYPES))})")
    if w * h > max_pixels:
        raise UploadError(413, f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    try:
        return open_rgb(data, name=name, max_pixels=max_pixels)
    except ValueError as exc:
        raise UploadError(400, str(exc)) from exc


def result_json(result: Prediction, images: dict) -> dict:
    """The API's answer: the prediction plus each attention map over a 320 px copy of its image."""
    body = result.to_dict()
    overlays, small = {}, {}
    for name, img in images.items():
        small[name] = img.copy()
        small[name].thumbnail((320, 320))
        small[name] = small[name].convert("RGB")
    for key, amap in result.attention.items():
        source = small.get(key.split(".")[0]) or small.get("derm")
        if source is not None:
            overlays[key] = jpeg_data_url(overlay_attention(source, amap))
    body["attention_overlays"] = overlays
    body["notice"] = "Research tool, not a medical device. Do not use for diagnosis."
    return body


def create_app(predictor: Predictor, max_upload_mb: float = 10.0, max_pixels: int = 25_000_000,
               max_queue: int = 64, token: str | None = None, request_timeout: float = 30.0,
               predict_timeout: float = 60.0, max_batch: int = 8, batch_wait_ms: float = 5.0,
               figures: dict | None = None) -> FastAPI:
    """`token`: required as `Authorization: Bearer TOKEN` on every /api call. `request_timeout`:
    seconds to receive a request body (408 after); `predict_timeout`: seconds for a prediction,
    queueing included (504 after). Concurrent predictions are gathered into batches of at most
    `max_batch`, waiting at most `batch_wait_ms` for company (web/batching.py); 1 = one at a time.
    `figures`: the model's `evaluate` metrics.json, quoted in case reports."""
    max_bytes = int(max_upload_mb * 2**20)
    # Starlette spools multipart files over 1 MB to a temp file on disk; keep them in memory.
    MultiPartParser.spool_max_size = max_bytes + 1
    batcher = MicroBatcher(predictor.run, max_batch=max_batch, max_wait_ms=batch_wait_ms)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await asyncio.to_thread(batcher.close)  # server shutdown: finish queued predictions, stop the worker

    app = FastAPI(title="sevenpoint", docs_url="/docs", redoc_url=None, lifespan=lifespan)
    state = {"waiting": 0}
    expected = f"Bearer {token}".encode() if token else None

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if expected is not None and request.url.path.startswith("/api/"):
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                response = JSONResponse({"error": "missing or wrong access token (send Authorization: Bearer TOKEN)"},
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
            else:
                response = await call_next(request)
        else:
            response = await call_next(request)
        if not request.url.path.startswith(("/docs", "/openapi.json")):  # the API docs load their own scripts
            response.headers.update(SECURITY_HEADERS)
        return response

    @app.get("/app.js")
    def script() -> FileResponse:
        return FileResponse(STATIC / "app.js", media_type="text/javascript")

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        html = (STATIC / "index.html").read_text()
        options = {k: "".join(f'<option value="{v}">{v}</option>' for v in vals) for k, vals in META_FIELDS.items()}
        for k, opts in options.items():
            html = html.replace(f"{{{{{k}_options}}}}", opts)
        return html.replace("{{max_mb}}", f"{max_upload_mb:g}")

    @app.get("/health")
    def health() -> dict:
        gov = predictor.governor
        threads = None if gov is None else {"now": gov.threads, "full": gov.full, "switches": gov.switches}
        return {"status": "ok", "model": predictor.info, "queue": state["waiting"], "max_queue": max_queue,
                "threads": threads,
                "batching": {"max_batch": max_batch, "wait_ms": batch_wait_ms, **batcher.stats.to_dict()}}

    async def predict_request(request: Request):
        """(result, images, meta) of one POSTed case, or the JSONResponse that says why not."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            return JSONResponse({"error": f"request body of {int(length)} bytes exceeds the limit of "
                                          f"{max_bytes} bytes ({max_upload_mb:g} MB)"}, status_code=413)
        if state["waiting"] >= max_queue:
            return JSONResponse({"error": "server busy: too many predictions queued, retry shortly"}, status_code=503,
                                headers={"Retry-After": "2"})
        state["waiting"] += 1
        try:
            body = bytearray()
            try:
                async with asyncio.timeout(request_timeout):
                    async for chunk in request.stream():
                        body += chunk
                        if len(body) > max_bytes:
                            return JSONResponse({"error": f"request body exceeds the limit of {max_bytes} bytes"},
                                                status_code=413)
            except TimeoutError:
                return JSONResponse({"error": f"request body not received within {request_timeout:g} s"},
                                    status_code=408)
            try:
                fields = await _parse_form(request, bytes(body), max_bytes)
                images = {k: _check_image(k, fields[k], max_pixels) for k in ("derm", "clinic")
                          if isinstance(fields.get(k), bytes)}
                meta = {k: (fields.get(k) or None) for k in META_FIELDS}
                fixes = {k: fields[k] for k in CRITERIA if fields.get(k)}  # the clinician's criteria
                async with asyncio.timeout(predict_timeout):
                    case = {"derm": images.get("derm"), "clinic": images.get("clinic"), "meta": meta,
                            "corrections": fixes}
                    prepared = await asyncio.to_thread(predictor.prepare, case)
                    result = await asyncio.wrap_future(batcher.submit(prepared))
            except TimeoutError:
                return JSONResponse({"error": f"prediction did not finish within {predict_timeout:g} s; "
                                              "the server is overloaded, retry later"}, status_code=504,
                                    headers={"Retry-After": "5"})
            except UploadError as exc:
                return JSONResponse({"error": exc.message}, status_code=exc.status)
            except PredictError as exc:
                return JSONResponse({"error": str(exc)}, status_code=422)
            return result, images, meta
        finally:
            state["waiting"] -= 1

    @app.post("/api/predict")
    async def api_predict(request: Request):
        done = await predict_request(request)
        if isinstance(done, JSONResponse):
            return done
        # the overlays are the costliest part of an answer: built off the event loop, beside other work
        return JSONResponse(await asyncio.to_thread(result_json, *done[:2]))

    @app.post("/api/report")
    async def api_report(request: Request):
        """The same fields as /api/predict; the answer is the case report (self-contained HTML)."""
        done = await predict_request(request)
        if isinstance(done, JSONResponse):
            return done
        result, images, meta = done
        page = await asyncio.to_thread(render_report, result, images, meta, predictor.info,
                                       predictor.artifacts.provenance, figures)
        return HTMLResponse(page, headers={"Content-Disposition": "inline; filename=case-report.html"})

    return app


async def _parse_form(request: Request, body: bytes, max_bytes: int) -> dict:
    """Multipart form from the already-read body: file fields -> bytes, text fields -> str."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise UploadError(415, "send multipart/form-data with fields derm, clinic (files), sex, location, elevation")

    async def stream():
        yield body

    parser = MultiPartParser(request.headers, stream(), max_files=4, max_fields=16, max_part_size=max_bytes)
    try:
        form = await parser.parse()
    except Exception as exc:  # malformed multipart
        raise UploadError(400, f"malformed multipart body ({exc})") from exc
    known = {"derm", "clinic", *META_FIELDS, *CRITERIA}
    unknown = sorted(set(form.keys()) - known)
    if unknown:
        raise UploadError(400, f"unknown field(s) {unknown}; expected: derm, clinic, {', '.join(META_FIELDS)} "
                               f"and, to correct a criterion, any of {', '.join(CRITERIA)}")
    out: dict = {}
    for key, value in form.multi_items():
        if hasattr(value, "read"):
            data = await value.read()
            await value.close()
            if data or value.filename:  # an unselected <input type=file> sends no name and no bytes
                out[key] = data
        else:
            out[key] = str(value).strip()
    return out

