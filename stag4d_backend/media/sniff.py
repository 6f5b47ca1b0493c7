"""What a file is, from its first bytes (never its name): one table for the CLI, the server and preprocessing."""

from __future__ import annotations

from pathlib import Path

SNIFF_BYTES = 16


def sniff(head: bytes) -> tuple[str, str, str] | None:
    """(kind "image" | "video", media type, suffix) of a file starting with ``head``, or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image", "image/png", ".png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image", "image/jpeg", ".jpg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image", "image/webp", ".webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image", "image/gif", ".gif"
    if head.startswith(b"BM"):
        return "image", "image/bmp", ".bmp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "image", "image/tiff", ".tif"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand == b"qt  ":
            return "video", "video/quicktime", ".mov"
        return "video", "video/mp4", ".mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "video", "video/webm", ".webm"  # WebM / Matroska (EBML)
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "video", "video/x-msvideo", ".avi"
    return None


def sniff_file(path: str | Path) -> tuple[str, str, str] | None:
    with open(path, "rb") as fh:
        return sniff(fh.read(SNIFF_BYTES))


__all__ = ["sniff", "sniff_file", "SNIFF_BYTES"]
