"""Progress bars: one place that decides whether and how a long job shows its progress (tqdm)."""

from __future__ import annotations

__all__ = ["progress_bar"]


def progress_bar(total: int | None = None, *, desc: str, unit: str = "it", enabled: bool = True, initial: int = 0,
                 leave: bool = True):
    """A tqdm bar on stderr, or a silent stand-in with the same methods when ``enabled`` is False."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, leave=leave)
