"""The dashboard: its page (NOVA's JSON greeting for non-browsers), its own script and stylesheet, and the
graph library from the installed package (api/vendor.py). None of these needs a key: the page signs in
by itself (POST /session) and reads everything else through the API with its session cookie."""

from __future__ import annotations

import hashlib
from importlib import resources as package_files
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

from api import vendor
from api.errors import error_body
from api.version import SERVICE, VERSION

# The page runs only our own files and talks only to its own origin: no inline script or style, no
# other site's script, no framing. vis-network styles its elements through the DOM (allowed: the CSP
# blocks style attributes and <style> in markup, not element.style) and draws on a canvas.
CSP = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
# Versioned URLs: a year, and never revalidated.
LONG_CACHE = "public, max-age=31536000, immutable"
VIS_FILES = {"vis-network.min.js": "application/javascript", "vis-network.css": "text/css"}
OWN_FILES = {"app.js": "application/javascript", "app.css": "text/css"}
MISSING_BASE = "/vendor/vis-network/missing"


def _static(name: str) -> str:
    return package_files.files("api").joinpath(f"static/{name}").read_text()


def create_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)
    vis = vendor.find_vis_network()
    page = _static("index.html").replace("__VIS_BASE__", vis.base if vis else MISSING_BASE)
    # Our own files change with each deploy under the same URL: revalidated by ETag on each load.
    own = {name: (_static(name).encode(), kind) for name, kind in OWN_FILES.items()}
    etags = {name: '"' + hashlib.sha256(body).hexdigest()[:32] + '"' for name, (body, _) in own.items()}

    @router.get("/")
    async def root(request: Request) -> Response:
        # Browsers get the dashboard; NOVA's scripts, which ask for JSON, get what NOVA answered here.
        if "text/html" in request.headers.get("accept", ""):
            return HTMLResponse(page, headers=PAGE_HEADERS)
        return JSONResponse(
            {"name": SERVICE, "version": VERSION, "status": "healthy", "docs": "/docs", "redoc": "/redoc"}
        )

    @router.get("/dashboard/{name}")
    async def own_file(name: str, request: Request) -> Response:
        if name not in own:
            return JSONResponse(error_body("not_found", f"no dashboard file {name}"), status_code=404)
        headers = {"Cache-Control": "no-cache", "ETag": etags[name], "X-Content-Type-Options": "nosniff"}
        if request.headers.get("if-none-match") == etags[name]:
            return Response(status_code=304, headers=headers)
        body, kind = own[name]
        return Response(body, media_type=kind, headers=headers)

    @router.get("/vendor/vis-network/{version}/{name}")
    async def graph_library(version: str, name: str) -> Response:
        if vis is None:
            return JSONResponse(error_body("unavailable", vendor.MISSING), status_code=503)
        if version != vis.version or name not in VIS_FILES:
            return JSONResponse(error_body("not_found", f"no file {name} of vis-network {version}"), status_code=404)
        path: Path | None = vis.script if name == "vis-network.min.js" else vis.stylesheet
        if path is None:
            return JSONResponse(error_body("not_found", f"pyvis ships no {name}"), status_code=404)
        return FileResponse(
            path, media_type=VIS_FILES[name], headers={"Cache-Control": LONG_CACHE, "X-Content-Type-Options": "nosniff"}
        )

    return router
