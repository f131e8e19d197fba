"""RFC 9457 problem+json for every error, each with a stable ``code``; exceptions map to HTTP here only."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.core.errors import NotFound, ProblemError, unavailable
from api.core.leases import InvalidTransition
from api.core.queue import BrokerUnavailable
from api.core.registry import PromotionRefused
from api.core.storage import ObjectNotFound, StorageError

log = logging.getLogger(__name__)
PROBLEM = "application/problem+json"


def problem_response(request: Request, err: ProblemError) -> JSONResponse:
    body = {"type": f"/problems/{err.code}", "title": err.title, "status": err.status, "detail": err.detail,
            "code": err.code, "instance": request.url.path, **err.extra}
    return JSONResponse(body, status_code=err.status, media_type=PROBLEM, headers=err.headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(ProblemError)
    async def _problem(request: Request, exc: ProblemError) -> JSONResponse:
        return problem_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        return problem_response(request, ProblemError(422, "invalid_request", "the request is not valid",
                                                      errors=errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, f"http_{exc.status_code}")
        return problem_response(request, ProblemError(exc.status_code, code, str(exc.detail)))

    @app.exception_handler(NotFound)  # jobs, training runs, model versions: each subclass names its code
    async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
        return problem_response(request, ProblemError(404, exc.code, str(exc)))

    @app.exception_handler(PromotionRefused)
    async def _refused(request: Request, exc: PromotionRefused) -> JSONResponse:
        return problem_response(request, ProblemError(409, exc.code, str(exc)))

    @app.exception_handler(ObjectNotFound)
    async def _no_object(request: Request, exc: ObjectNotFound) -> JSONResponse:
        return problem_response(request, ProblemError(404, "result_not_found", "the result object is missing"))

    @app.exception_handler(InvalidTransition)
    async def _conflict(request: Request, exc: InvalidTransition) -> JSONResponse:
        return problem_response(request, ProblemError(409, "invalid_state", str(exc)))

    @app.exception_handler(StorageError)
    async def _storage(request: Request, exc: StorageError) -> JSONResponse:
        log.warning("storage unavailable: %s", exc)
        return problem_response(request, unavailable("storage_unavailable", "object storage is unavailable"))

    @app.exception_handler(BrokerUnavailable)
    async def _broker(request: Request, exc: BrokerUnavailable) -> JSONResponse:
        log.warning("broker unavailable: %s", exc)
        return problem_response(request, unavailable("broker_unavailable", "the job queue is unavailable"))

    @app.exception_handler(OperationalError)
    @app.exception_handler(DBAPIError)
    async def _database(request: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable: %s", type(exc).__name__)
        return problem_response(request, unavailable("database_unavailable", "the database is unavailable"))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return problem_response(request, ProblemError(500, "internal_error", "an unexpected error occurred"))
