"""The static files of the pages and the one way to read them: by a name in a fixed table."""

from __future__ import annotations

from importlib import resources

__all__ = ["FILES", "PAGES", "read"]

# Every file a page may load, with its media type. A name outside this table is never
# opened, so a request path cannot reach any other file of the package or the disk.
FILES: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "viewer.html": "text/html; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "trace.js": "text/javascript; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
    "viewer.js": "text/javascript; charset=utf-8",
}
PAGES = ("index.html", "viewer.html")


def read(name: str) -> tuple[bytes, str]:
    """(content, media type) of the static file ``name``; KeyError for a name not in FILES."""
    media = FILES[name]
    return resources.files(__package__).joinpath("static", name).read_bytes(), media
