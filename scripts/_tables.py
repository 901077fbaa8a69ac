"""Markdown tables printed by the GPU check scripts (scripts/gpu_*_checks.py)."""
from __future__ import annotations

from typing import List


def table(title: str, header: List[str], rows: List[list]) -> None:
    """Print ``rows`` under ``header`` as a Markdown table with a ### title; floats to 4 significant digits."""
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |")
