"""Errors as the OpenAI API shapes them: an `ApiError` anywhere in a route becomes its status and body, a
request that fails validation a 400 naming the field (or 422 for a body that is not JSON), anything else a
500 that names the exception."""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from spectr.server.metrics import ServerMetrics
from spectr.server.schemas import UNSUPPORTED


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def internal_error_body(error: BaseException) -> dict:
    """A 500's body; it names the exception's type, as some exceptions have no message."""
    return error_body(f"internal error: {type(error).__name__}: {error}", "server_error")


def validation_message(problem: dict) -> tuple[str, str]:
    """(message, field) of pydantic's first complaint about a body."""
    location = [str(part) for part in problem.get("loc", ())[1:]]
    # a union's alternatives add their own names (e.g. 'str', 'list[TextPart]') after the field: drop them
    field = ".".join(part for part in location if not any(c in part for c in "[]") and part not in
                     ("str", "int", "float", "bool")) or "body"
    unsupported = next((i for i, part in enumerate(location) if part in UNSUPPORTED), None)
    if unsupported is not None and problem.get("type") in ("extra_forbidden", "literal_error", "none_required"):
        field = ".".join(location[: unsupported + 1])
        return f"'{field}' is not supported: {UNSUPPORTED[location[unsupported]]}", field
    if problem.get("type") == "extra_forbidden":
        return f"'{field}' is not a field this server knows; it is refused rather than ignored", field
    return f"invalid '{field}': {problem.get('msg')}", field


def install_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, error: ApiError):
        metrics.requests.labels(request.url.path, str(error.status)).inc()
        return JSONResponse(error_body(error.message, error.kind, error.param), error.status, headers=error.headers)

    @app.exception_handler(Exception)
    async def on_unexpected_error(request: Request, error: Exception):
        # an OpenAI-style body instead of Starlette's plain text; Starlette re-raises, so the traceback is still logged
        metrics.requests.labels(request.url.path, "500").inc()
        return JSONResponse(internal_error_body(error), 500)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError):
        problems = error.errors()
        if any(problem.get("type") == "json_invalid" for problem in problems):
            metrics.requests.labels(request.url.path, "422").inc()
            return JSONResponse(error_body("the request body is not valid JSON", "invalid_request_error"), 422)
        # a part's wrong type first (an image part: only text is taken), then unknown fields: they say more
        # than the other alternatives of a union
        def rank(problem: dict) -> int:
            if problem.get("type") == "literal_error" and problem.get("loc", ())[-1:] == ("type",):
                return 0
            return 1 if problem.get("type") == "extra_forbidden" else 2

        first = min(problems, key=rank)
        message, field = validation_message(first)
        metrics.requests.labels(request.url.path, "400").inc()
        return JSONResponse(error_body(message, "invalid_request_error", field), 400)
