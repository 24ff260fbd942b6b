"""Matplotlib figures to PNG bytes, headless."""

from __future__ import annotations

import io


def png_bytes(fig) -> bytes:
    """The figure as PNG (100 dpi), then closed so a long run does not accumulate open figures."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
