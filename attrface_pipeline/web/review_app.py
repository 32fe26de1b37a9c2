"""The review web app: a Starlette app over the QC'd pairs and the SQLite decision store.

``attrface review`` serves it with uvicorn on 127.0.0.1. A token (``--token``) is required to bind anything else:
requests then need ``?token=...`` once (it is kept in an HttpOnly cookie) or an ``Authorization: Bearer`` header.
"""

from __future__ import annotations

import hmac
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from attrface_pipeline.stages.review import ReviewStore, review_items

COOKIE = "attrface_review_token"


class _TokenGate(BaseHTTPMiddleware):
    def __init__(self, app, token: str):
        super().__init__(app)
        self.token = token

    async def dispatch(self, request: Request, call_next):
        offered = (request.query_params.get("token") or request.cookies.get(COOKIE)
                   or request.headers.get("authorization", "").removeprefix("Bearer ").strip())
        if not offered or not hmac.compare_digest(offered.encode(), self.token.encode()):
            return Response("review app: a valid token is required (?token=...)", status_code=401)
        response = await call_next(request)
        if request.query_params.get("token"):
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
        return response


def create_app(data_root: str | Path, db_path: str | Path, token: str | None = None,
               include_failed: bool = False, allowed_hosts: list[str] | None = None) -> Starlette:
    store = ReviewStore(db_path)
    page = resources.files("attrface_pipeline.web").joinpath("review.html").read_text()

    def items() -> dict[str, dict]:  # re-read per request: a running build may add partitions
        return {i["pair_key"]: i for i in review_items(data_root, include_failed)}

    async def index(request: Request) -> HTMLResponse:
        return HTMLResponse(page)

    async def pairs(request: Request) -> JSONResponse:
        all_items = items()
        decisions = store.decisions(all_items)
        out = []
        for key, item in all_items.items():
            public = {k: v for k, v in item.items() if not k.endswith("_path")}
            public["decision"] = decisions.get(key)
            out.append(public)
        return JSONResponse({"pairs": out, "attributes": sorted({i["attribute"] for i in out})})

    async def decide(request: Request) -> JSONResponse:
        # Cross-site pages can POST text/plain without a preflight: insist on JSON from this origin.
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return JSONResponse({"error": "Content-Type must be application/json"}, status_code=415)
        origin = request.headers.get("origin")
        if origin and urlsplit(origin).netloc != request.headers.get("host"):
            return JSONResponse({"error": f"cross-origin request from {origin} refused"}, status_code=403)
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return JSONResponse({"error": "expected a JSON object"}, status_code=400)
        key = str(body.get("pair_key", ""))
        if key not in items():
            return JSONResponse({"error": f"unknown pair {key!r}"}, status_code=404)
        try:
            saved = store.decide(key, str(body.get("decision", "")), str(body.get("reviewer", "")),
                                 str(body.get("note", "")))
        except ValueError as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        return JSONResponse(saved)

    async def image(request: Request) -> Response:
        item = items().get(request.path_params["pair_key"])
        kind = request.path_params["kind"]
        if item is None or kind not in ("source", "edit"):
            return Response("not found", status_code=404)
        return FileResponse(item[f"{kind}_path"])

    routes = [
        Route("/", index),
        Route("/api/pairs", pairs),
        Route("/api/decisions", decide, methods=["POST"]),
        Route("/img/{kind}/{pair_key}", image),
    ]
    # Host check against DNS rebinding: a page on another name resolving to 127.0.0.1 cannot read the API.
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or ["127.0.0.1", "localhost", "::1"])]
    if token:
        middleware.append(Middleware(_TokenGate, token=token))
    return Starlette(routes=routes, middleware=middleware)


def serve(data_root: str | Path, db_path: str | Path, host: str = "127.0.0.1", port: int = 8765,
          token: str | None = None, include_failed: bool = False) -> None:
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        raise ValueError(f"refusing to serve review decisions on {host} without --token")
    hosts = None if host in ("127.0.0.1", "localhost", "::1") else ["*"]  # remote use: the token guards it
    uvicorn.run(create_app(data_root, db_path, token, include_failed, hosts), host=host, port=port,
                log_level="warning")
