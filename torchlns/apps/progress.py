"""Progress lines for the jobs: a tqdm bar on a terminal, plain log lines elsewhere."""

from __future__ import annotations

import sys
import time

__all__ = ["LogProgress"]


def _progress(iterable, desc: str, total=None):
    """A tqdm bar on a terminal; elsewhere (a log, CI) a plain line at each quarter (``LogProgress``)."""
    if not sys.stderr.isatty():
        return LogProgress(iterable, desc, total)
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


class LogProgress:
    """tqdm's interface used here (iteration, ``update``, ``set_postfix``, ``close``) as log lines:
    ``desc: 50% (250/500) in 41 s, loss=0.512`` at each quarter, never a carriage return."""

    def __init__(self, iterable, desc: str, total=None, file=None):
        self.iterable, self.desc, self.n, self.postfix = iterable, desc, 0, ""
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.file, self.start, self.quarter = file, time.time(), 0

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def set_postfix(self, **values):
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1):
        self.n += n
        if self.total:
            while self.quarter < 3 and self.n * 4 >= (self.quarter + 1) * self.total:
                self.quarter += 1
                self._line(f"{25 * self.quarter}%")

    def close(self):
        if self.quarter < 4:
            self.quarter = 4
            self._line("done" if not self.total else "100%")

    def _line(self, where: str):
        total = f"/{self.total}" if self.total else ""
        tail = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {where} ({self.n}{total}) in {time.time() - self.start:.0f} s{tail}",
              file=self.file or sys.stderr, flush=True)
