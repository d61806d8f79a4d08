"""A bar chart of the most sensitive groups, as PNG bytes and as a markdown image.

Prefect's UI renders markdown images only from URLs the browser can load; a ``file://``
path on the worker is not one. The chart is therefore embedded in the markdown as a base64
``data:`` URI, which renders anywhere the markdown does.
"""

from __future__ import annotations

import base64
import io

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bevfusion_ptq.quant.sensitivity import SensitivityResult


def sensitivity_png(result: SensitivityResult, top: int = 15) -> bytes:
    """Horizontal bars, most sensitive on top: recovery (left float) and only-this-group drop."""
    groups = list(result.groups[:top])[::-1]
    fig = Figure(figsize=(8.0, 0.35 * len(groups) + 1.6), dpi=90)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    y = range(len(groups))
    ax.barh([i + 0.2 for i in y], [g.recovery for g in groups], height=0.4, label="recovery when left in float")
    ax.barh([i - 0.2 for i in y], [g.only for g in groups], height=0.4, label="drop when only this group is INT8")
    ax.set_yticks(list(y))
    ax.set_yticklabels([g.name if len(g.name) <= 48 else "…" + g.name[-47:] for g in groups], fontsize=7)
    ax.set_xlabel(result.metric)
    ax.set_title(f"Top {len(groups)} of {len(result.groups)} groups (all INT8: {result.all_drop:.3g})", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def markdown_image(png: bytes, alt: str = "sensitivity chart") -> str:
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode('ascii')})"
