"""The FastAPI application of ``rvl serve``: the JSON API over :class:`~rvl.serve.service.StudyService` and the page.

Study-level routes take the study as multipart form fields: ``files`` (one or more images of ONE study, with optional
``views``), or ``upload_id`` (a study uploaded before and still cached), or ``study_id`` (an archive study). With a
token, every ``/api`` route needs ``Authorization: Bearer <token>``; the page itself holds no data. Request bodies are
limited before they are read; the access log names method, path and status only (never report text, patient ids or
query text, which travel in request bodies).
"""
from __future__ import annotations

import logging
import secrets
import time
from importlib import resources
from typing import Any, Optional

from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles

from rvl.serve import schemas
from rvl.serve.service import DEFAULT_K, StudyService
from rvl.serve.studies import ServiceError, StudyEntry
from rvl.serve.uploads import UploadError
from rvl.version import __version__

logger = logging.getLogger("rvl.serve")

MULTIPART_SLACK = 1 << 20  # form fields and part headers on top of the image bytes
_bearer = HTTPBearer(auto_error=False, description="the --token given to rvl serve")
_ERRORS = {code: {"model": schemas.Error} for code in (400, 401, 404, 409, 413)}
# The page loads nothing from elsewhere: scripts, styles and images come from this server (or data:/blob: URLs).
_PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                 "frame-ancestors 'none'", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


class RequestGuard:
    """ASGI middleware: refuses request bodies over ``max_bytes`` (413) or of unknown length (411) before they are
    read, adds safety headers, and logs one line per request: method, route template, status and time."""

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = {"code": 0}
        headers = dict(scope.get("headers") or [])
        if scope["method"] in ("POST", "PUT", "PATCH"):
            length = headers.get(b"content-length")
            refusal = None
            if length is None and headers.get(b"transfer-encoding"):
                refusal = (411, "send the request with a Content-Length header")
            elif length is not None and (not length.isdigit() or int(length) > self.max_bytes):
                refusal = (413, f"request body over the limit of {self.max_bytes / 2**20:.0f} MiB; upload fewer or "
                           "smaller images (rvl serve --max-upload-mb)")
            if refusal is not None:
                logger.info("%s request refused before reading: %d", scope["method"], refusal[0])
                return await JSONResponse({"detail": refusal[1]}, status_code=refusal[0])(scope, receive, send)

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                extra = [(k.lower().encode(), v.encode()) for k, v in _PAGE_HEADERS.items()]
                if scope["path"].startswith("/api/"):
                    extra.append((b"cache-control", b"no-store"))  # patient data: never in a browser cache
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:  # the route template, not the path: study ids can embed patient ids
            route = getattr(scope.get("route"), "path", None) or ("/static/*" if scope["path"].startswith("/static/")
                                                                   else "(no route)")
            logger.info("%s %s %d %.0f ms", scope["method"], route, status["code"],
                        1000 * (time.perf_counter() - started))


def _service(request: Request) -> StudyService:
    return request.app.state.service


def _check_token(request: Request, credentials: Optional[HTTPAuthorizationCredentials] = Depends(_bearer)) -> None:
    token = request.app.state.token
    if token is None:
        return
    given = credentials.credentials if credentials is not None else ""
    if not secrets.compare_digest(given.encode(), token.encode()):
        raise HTTPException(401, "missing or wrong token: send 'Authorization: Bearer <token>' (rvl serve --token)",
                            headers={"WWW-Authenticate": "Bearer"})


def _study(request: Request,
           files: Optional[list[UploadFile]] = File(None, description="images of ONE study (DICOM, PNG, JPEG)"),
           views: Optional[list[str]] = Form(None, description="view per file (PA, AP, LATERAL, LL, OTHER; empty "
                                             "or 'auto' = DICOM ViewPosition), repeated or comma-separated"),
           upload_id: Optional[str] = Form(None, description="a study uploaded earlier (returned as study.upload_id)"),
           study_id: Optional[str] = Form(None, description="an archive study of the index"),
           patient_id: Optional[str] = Form(None, description="patient of an upload (default: DICOM PatientID)"),
           study_date: Optional[str] = Form(None, description="YYYY-MM-DD (default: DICOM StudyDate)"),
           ) -> StudyEntry:
    """The study a request is about, from exactly one of files / upload_id / study_id."""
    service = _service(request)
    given = [name for name, value in (("files", files), ("upload_id", upload_id), ("study_id", study_id)) if value]
    if len(given) != 1:
        raise ServiceError("send exactly one of: files (images of one study), upload_id, study_id"
                           + (f"; got {', '.join(given)}" if given else ""))
    if study_id:
        return service.archive_study(study_id)
    if upload_id:
        return service.cached_upload(upload_id, patient_id, study_date)
    if views and len(views) == 1 and "," in views[0]:
        views = views[0].split(",")
    uploads = [(f.filename or "", f.file.read(service.max_upload_bytes + 1)) for f in files]
    return service.upload_study(uploads, views, patient_id, study_date)


def _view_png(service: StudyService, study: StudyEntry, view: int, size: int) -> Response:
    return Response(service.view_png(study, view, size), media_type="image/png")


def create_app(service: StudyService, token: str | None = None) -> FastAPI:
    """The application: ``/`` (the page), ``/static``, the ``/api`` routes and ``/openapi.json``.

    The interactive docs pages are off (FastAPI loads them from a CDN; the server must work offline).
    """
    app = FastAPI(title="rvl serve", version=__version__, docs_url=None, redoc_url=None,
                  description="Zero-shot findings, grounding heatmaps and similar-study retrieval for radiographs.")
    app.state.service = service
    app.state.token = token or None
    app.add_middleware(RequestGuard, max_bytes=service.max_upload_bytes + MULTIPART_SLACK)
    static = resources.files("rvl.serve").joinpath("static")

    @app.exception_handler(ServiceError)
    @app.exception_handler(UploadError)
    async def _known_error(request: Request, err: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=getattr(err, "status", 400))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, getattr(request.scope.get("route"), "path", "?"))
        return JSONResponse({"detail": f"internal error ({type(err).__name__}); see the server log"}, status_code=500)

    api = APIRouter(prefix="/api", dependencies=[Depends(_check_token)], responses=_ERRORS)

    @api.get("/health", summary="model, indexes and limits")
    def health(request: Request) -> dict[str, Any]:
        return _service(request).health()

    @api.post("/zeroshot", response_model=schemas.ZeroShot, summary="the 14 CheXpert probabilities of a study")
    def zeroshot(request: Request, study: StudyEntry = Depends(_study)) -> dict[str, Any]:
        return _service(request).zeroshot(study)

    @api.post("/heatmap", response_model=schemas.Heatmap, summary="where each view matches a finding or prompt")
    def heatmap(request: Request, study: StudyEntry = Depends(_study),
                prompt: str = Form(..., description="a CheXpert label (its prompt ensemble) or free text")
                ) -> dict[str, Any]:
        return _service(request).heatmap(study, prompt)

    @api.post("/similar", response_model=schemas.Similar, summary="the k most similar archive studies")
    def similar(request: Request, study: StudyEntry = Depends(_study), k: int = Form(DEFAULT_K, ge=1, le=100),
                exclude_patient: bool = Form(False, description="leave out this patient's studies"),
                priors_only: bool = Form(False, description="only this patient's studies dated before this one"),
                date_from: Optional[str] = Form(None, description="YYYY-MM-DD, inclusive"),
                date_to: Optional[str] = Form(None, description="YYYY-MM-DD, inclusive")) -> dict[str, Any]:
        return _service(request).similar(study, k, exclude_patient, priors_only, date_from, date_to)

    @api.post("/search", response_model=schemas.TextSearch, summary="archive studies best matching a text query")
    def search(request: Request, query: schemas.SearchRequest) -> dict[str, Any]:
        return _service(request).search_text(query.text, query.k, query.date_from, query.date_to, query.patient_id)

    # study ids may hold "/" (MIMIC-style "p10/p10000032/s5041", ids from folder paths): the client sends it as %2F,
    # which the server decodes before routing, so the id is a path parameter; the image route is declared first
    png = {"response_class": Response, "responses": {200: {"content": {"image/png": {}}, "description": "PNG"}}}
    size_query = Query(1024, ge=32, le=2048, description="long side in pixels")

    @api.get("/study/{study_id:path}/image/{view}", summary="a view of an archive study (from the index metadata)",
             **png)
    def study_image(request: Request, study_id: str, view: int, size: int = size_query) -> Response:
        return _view_png(_service(request), _service(request).archive_study(study_id), view, size)

    @api.get("/study/{study_id:path}", response_model=schemas.StudyRecord, summary="an archive study: report, labels")
    def study_record(request: Request, study_id: str) -> dict[str, Any]:
        return _service(request).study_record(study_id)

    @api.get("/upload/{upload_id}/image/{view}", summary="a view of an uploaded (cached) study", **png)
    def upload_image(request: Request, upload_id: str, view: int, size: int = size_query) -> Response:
        return _view_png(_service(request), _service(request).cached_upload(upload_id), view, size)

    app.include_router(api)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(str(static.joinpath("index.html")), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    return app
