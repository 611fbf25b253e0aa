"""Matplotlib for files and pages: the Agg backend (no display on a cluster node), figures as PNG."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

DPI = 90


def pyplot() -> Any:
    """``matplotlib.pyplot`` drawing off-screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path) -> None:
    """Lay out ``fig``, write it to ``path`` and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    pyplot().close(fig)


def png_base64(fig: Any) -> str:
    """``fig`` as base64 PNG, for an ``<img>`` inlined in a page; closed."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=DPI)
    pyplot().close(fig)
    return base64.b64encode(buffer.getvalue()).decode()
