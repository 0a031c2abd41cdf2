"""Plain-text tables for the terminal and the README (no rich dependency for one table)."""
from __future__ import annotations


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [headers] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(str(r[i])) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells[1:]])


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.2%}"
    return str(value)


def machine() -> str:
    """The CPU that measured a benchmark, named beside its figures: machines of one kind differ (AMD EPYC,
    Intel Xeon with AVX-512), and only figures from one run on one CPU compare."""
    import os
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            lines = info.read().splitlines()
        name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), name)
        flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), None)
        if flags is not None:  # "AMD EPYC" alone names CPUs with and without AVX-512, which differ in speed
            name += ", AVX-512" if "avx512f" in flags else ", no AVX-512"
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({name})"
