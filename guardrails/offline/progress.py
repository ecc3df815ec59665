"""Progress bars for long offline work (activations, SAE training): tqdm, redrawn less often off a terminal.

On a terminal (or in a notebook) tqdm redraws up to ten times a second. Piped into a log file (CI, ``... > log
2>&1``) every redraw is kept: a 2,300-row activation pass wrote about 300 copies of its bar. Off a terminal the bar
is redrawn at most every :data:`LOG_INTERVAL_S` seconds (and once at the end), so a log keeps the progress without
the flood. ``TQDM_MININTERVAL`` in the environment still wins where it is set.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm

LOG_INTERVAL_S = 15.0
"""Seconds between redraws when stderr is not a terminal (and not a notebook)."""


def interactive() -> bool:
    """Whether the bar is seen as it is drawn: stderr is a terminal, or a Jupyter kernel draws a widget."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty()) or "ipykernel" in sys.modules


def progress_bar(**kwargs: Any) -> Any:
    """``tqdm.auto.tqdm(**kwargs)``, with a long ``mininterval`` off a terminal unless the caller or the environment
    sets one."""
    if "mininterval" not in kwargs and "TQDM_MININTERVAL" not in os.environ and not interactive():
        kwargs["mininterval"] = LOG_INTERVAL_S
    return tqdm(**kwargs)
