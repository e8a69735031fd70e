"""Report figures on a bare Agg canvas (no pyplot state, no GUI backend)."""

from __future__ import annotations

import os
import pathlib


def new(figsize=(6, 4), dpi: int = 100):
  """(Figure, Axes) on its own Agg canvas; the global matplotlib backend and
  pyplot state are untouched, so this is safe in tests and on servers."""
  # pylint: disable=g-import-not-at-top
  from matplotlib import figure
  from matplotlib.backends import backend_agg
  fig = figure.Figure(figsize=figsize, dpi=dpi)
  backend_agg.FigureCanvasAgg(fig)
  return fig, fig.add_subplot()


def save(fig, path: os.PathLike | str) -> pathlib.Path:
  """Lays out and writes `fig` as a PNG at `path` (parents created)."""
  fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, format="png")
  return path
