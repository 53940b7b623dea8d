"""The web page and JSON API (FastAPI): one page, `POST /api/predict`, `GET /health`.

Uploads stay in memory (never written to disk, never logged); bodies over the limit are
refused from their Content-Length before being read, and while streaming otherwise.
Predictions run in a worker thread behind a bounded queue: requests beyond it get 503.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.formparsers import MultiPartParser

from ..data.images import open_rgb
from ..predict import Prediction, Predictor, PredictError
from ..schema import META_FIELDS
from ..viz import overlay_attention

STATIC = Path(__file__).parent / "static"
ALLOWED_TYPES = {"JPEG", "PNG", "BMP", "TIFF", "WEBP"}


class UploadError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _png_data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


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
    body = result.to_dict()
    overlays = {}
    for key, amap in result.attention.items():
        source = images.get(key.split(".")[0]) or images.get("derm")
        if source is not None:
            small = source.copy()
            small.thumbnail((320, 320))
            overlays[key] = _png_data_url(overlay_attention(small, amap))
    body["attention_overlays"] = overlays
    body["notice"] = "Research tool, not a medical device. Do not use for diagnosis."
    return body


def create_app(predictor: Predictor, max_upload_mb: float = 10.0, max_pixels: int = 25_000_000,
               max_queue: int = 64) -> FastAPI:
    max_bytes = int(max_upload_mb * 2**20)
    # Starlette spools multipart files over 1 MB to a temp file on disk; keep them in memory.
    MultiPartParser.spool_max_size = max_bytes + 1
    app = FastAPI(title="sevenpoint", docs_url="/docs", redoc_url=None)
    lock = threading.Lock()  # one forward pass at a time: the model's threads already use every core
    state = {"waiting": 0}

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        html = (STATIC / "index.html").read_text()
        options = {k: "".join(f'<option value="{v}">{v}</option>' for v in vals) for k, vals in META_FIELDS.items()}
        for k, opts in options.items():
            html = html.replace(f"{{{{{k}_options}}}}", opts)
        return html.replace("{{max_mb}}", f"{max_upload_mb:g}")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": predictor.info, "queue": state["waiting"], "max_queue": max_queue}

    @app.post("/api/predict")
    async def api_predict(request: Request):
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
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_bytes:
                    return JSONResponse({"error": f"request body exceeds the limit of {max_bytes} bytes"},
                                        status_code=413)
            try:
                fields = await _parse_form(request, bytes(body), max_bytes)
                images = {k: _check_image(k, fields[k], max_pixels) for k in ("derm", "clinic")
                          if isinstance(fields.get(k), bytes)}
                meta = {k: (fields.get(k) or None) for k in META_FIELDS}
                result = await asyncio.to_thread(_locked_predict, lock, predictor, images, meta)
            except UploadError as exc:
                return JSONResponse({"error": exc.message}, status_code=exc.status)
            except PredictError as exc:
                return JSONResponse({"error": str(exc)}, status_code=422)
            return JSONResponse(result_json(result, images))
        finally:
            state["waiting"] -= 1

    return app


def _locked_predict(lock: threading.Lock, predictor: Predictor, images: dict, meta: dict) -> Prediction:
    with lock:
        return predictor.predict(derm=images.get("derm"), clinic=images.get("clinic"), meta=meta)


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
    known = {"derm", "clinic", *META_FIELDS}
    unknown = sorted(set(form.keys()) - known)
    if unknown:
        raise UploadError(400, f"unknown field(s) {unknown}; expected: derm, clinic, {', '.join(META_FIELDS)}")
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

