"""The page at `/` (chat playground + live offload dashboard) and the JSON it polls.

`GET /` and `GET /static/NAME` serve the files of `serving/static/`, read once when the
app is built; they need no API key. The page learns from a meta tag of index.html whether
the server has one, and then asks for it before polling. `GET /v1/dashboard?since=N`
is the engine's snapshot (`Engine.dashboard`): the steps recorded after step N and the
counters now; without `since` it also carries the placement map (`Engine.describe`).
Like every `/v1/*` route it needs the key when the server has one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

from aioffload.serving.protocol import ApiError, error_response, json_response

if TYPE_CHECKING:
    from aioffload.serving.state import ServerState

STATIC_DIR = Path(__file__).parent / "static"
_CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                  ".css": "text/css; charset=utf-8", ".txt": "text/plain; charset=utf-8"}
_KEY_META = b'<meta name="aioffload-api-key" content="optional">'  # "required" with --api-key
# Everything the page loads comes from this server: no CDN, no inline script.
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:"}


def load_static(folder: Path = STATIC_DIR) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, content type) of every servable file in `folder`."""
    return {f.name: (f.read_bytes(), _CONTENT_TYPES[f.suffix]) for f in sorted(folder.iterdir())
            if f.is_file() and f.suffix in _CONTENT_TYPES}


def static_endpoints(
    api_key_required: bool, folder: Path = STATIC_DIR
) -> tuple[Callable[[Request], Awaitable[Response]], ...]:
    """(index, static file) endpoints over the files of `folder`, read now."""
    files = load_static(folder)
    if api_key_required:
        html, content_type = files["index.html"]
        assert _KEY_META in html, "index.html lost its aioffload-api-key meta tag"
        files["index.html"] = (html.replace(_KEY_META, _KEY_META.replace(b"optional", b"required")), content_type)

    def respond(name: str) -> Response:
        if name not in files:
            return error_response(ApiError(404, f"no static file {name!r}"))
        body, content_type = files[name]
        return Response(body, 200, _HEADERS, media_type=content_type)

    async def index(request: Request) -> Response:
        return respond("index.html")

    async def static_file(request: Request) -> Response:
        return respond(request.path_params["name"])

    return index, static_file


def parse_since(raw: str | None) -> int | None:
    """The `since` query parameter: absent, or a step number >= 0."""
    if raw is None:
        return None
    if not raw.isdigit():
        raise ApiError(400, f"since must be a step number >= 0, got {raw!r}", "since")
    return int(raw)


async def dashboard_data(state: ServerState, request: Request) -> Response:
    engine = state.engine
    if engine is None:
        raise ApiError(503, "the model is still loading", None, {"Retry-After": "5"})
    since = parse_since(request.query_params.get("since"))
    body: dict[str, Any] = engine.dashboard(since or 0)
    if since is None:
        body["placement"] = engine.describe()
    return json_response(body, headers={"Cache-Control": "no-store"})
