"""A loss curve as a PNG, with no plotting library: a polyline on a white
canvas, written with zlib. Gridlines mark tenths of the axes; the value range
is stored in the image's text chunks (``Title``, ``Comment``)."""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path
from typing import Sequence

__all__ = ["write_curve_png"]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_curve_png(path: "str | Path", xs: Sequence[float], series: dict[str, Sequence[float]],
                    width: int = 640, height: int = 360, title: str = "loss") -> Path:
    """Plot each series (same ``xs``; up to 3: blue, orange, green) and write a PNG.

    Non-finite points are skipped. Returns the path.
    """
    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44)]
    pixels = [bytearray(b"\xff" * (width * 3)) for _ in range(height)]
    pad = 20
    finite = [v for s in series.values() for v in s if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    x_lo, x_hi = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if x_hi - x_lo < 1e-12:
        x_hi = x_lo + 1

    def put(x: int, y: int, c) -> None:
        if 0 <= x < width and 0 <= y < height:
            pixels[y][3 * x:3 * x + 3] = bytes(c)

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (pad + (x - x_lo) / (x_hi - x_lo) * (width - 2 * pad),
                height - pad - (y - lo) / (hi - lo) * (height - 2 * pad))

    for i in range(11):
        gx = int(pad + i * (width - 2 * pad) / 10)
        gy = int(pad + i * (height - 2 * pad) / 10)
        shade = (120, 120, 120) if i in (0, 10) else (225, 225, 225)
        for y in range(pad, height - pad + 1):
            put(gx, y, shade)
        for x in range(pad, width - pad + 1):
            put(x, gy, shade)
    for (name, ys), c in zip(series.items(), colors):
        prev = None
        for x, y in zip(xs, ys):
            if not math.isfinite(y):
                prev = None
                continue
            px, py = to_px(x, y)
            if prev is not None:
                steps = int(max(abs(px - prev[0]), abs(py - prev[1]))) + 1
                for s in range(steps + 1):
                    t = s / steps
                    qx, qy = prev[0] + (px - prev[0]) * t, prev[1] + (py - prev[1]) * t
                    for dy in (0, 1):
                        put(int(qx), int(qy) + dy, c)
            prev = (px, py)
    raw = b"".join(b"\x00" + bytes(row) for row in pixels)
    text = f"{title}: " + ", ".join(series) + f"; x {x_lo:g}..{x_hi:g}; y {lo:.4g}..{hi:.4g}"
    png = (b"\x89PNG\r\n\x1a\n"
           + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + _chunk(b"tEXt", b"Title\x00" + title.encode("latin-1", "replace"))
           + _chunk(b"tEXt", b"Comment\x00" + text.encode("latin-1", "replace"))
           + _chunk(b"IDAT", zlib.compress(raw, 9))
           + _chunk(b"IEND", b""))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(png)
    tmp.replace(path)
    return path
