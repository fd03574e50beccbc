"""End-of-session table: each benchmark's median and its ratio to its group's baseline.

A benchmark marks itself as the (torch) baseline of its group with
``benchmark.extra_info["baseline"] = True``; groups come from
``@pytest.mark.benchmark(group=...)``.

    python -m pytest bench --benchmark-only -q
"""

from __future__ import annotations

import pytest


def _fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3f} {unit}"
    return f"{seconds / 1e-9:.1f} ns"


def _rows(benchmarks):
    """(group, name, median seconds, ratio or None, is_baseline) per benchmark with stats."""
    groups: dict = {}
    for b in benchmarks:
        stats = getattr(b, "stats", None)
        median = getattr(stats, "median", None) if stats else None
        if median is None:
            continue
        extra = getattr(b, "extra_info", None) or {}
        groups.setdefault(getattr(b, "group", None) or "(no group)", []).append(
            (getattr(b, "name", "?"), float(median), bool(extra.get("baseline")))
        )
    for group in sorted(groups):
        entries = groups[group]
        base = next((m for _, m, is_base in entries if is_base), None)
        for name, median, is_base in sorted(entries, key=lambda e: (not e[2], e[0])):
            yield group, name, median, (median / base if base else None), is_base


def format_ratio_table(benchmarks) -> str:
    rows = [
        (g, n + (" (baseline)" if is_base else ""), _fmt_time(m), "-" if r is None else f"{r:.2f}x")
        for g, n, m, r, is_base in _rows(benchmarks)
    ]
    if not rows:
        return ""
    header = ("group", "benchmark", "median", "vs baseline")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    benchmarks = getattr(session, "benchmarks", None)
    if not benchmarks:
        return
    try:
        table = format_ratio_table(benchmarks)
    except Exception as e:  # never let the summary break a benchmark run
        terminalreporter.write_line(f"torchlns bench summary failed: {type(e).__name__}: {e}")
        return
    if table:
        terminalreporter.write_sep("-", "torchlns: median and ratio to the torch baseline of each group")
        for row in table.splitlines():
            terminalreporter.write_line(row)
