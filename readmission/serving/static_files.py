"""The predict function's web page and its assets, read once at import.

Contract: `load_static(folder)` maps each file name of the folder to (bytes, MIME type);
`PAGE_HEADERS` are the headers every page file is served with (a strict Content Security
Policy: the page runs only its own scripts and writes data as text, tests/test_security.py).
"""

from __future__ import annotations

from pathlib import Path

_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def load_static(folder: Path) -> dict[str, tuple[bytes, str]]:
    return {
        path.name: (path.read_bytes(), _TYPES.get(path.suffix, "application/octet-stream"))
        for path in folder.iterdir()
        if path.is_file()
    }
