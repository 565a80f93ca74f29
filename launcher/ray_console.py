"""Ray's repeated warnings, collapsed on the driver's console so that raytron's own lines stay visible.

Ray forwards every worker's and actor's output to the driver; its own de-duplication only merges lines
printed within a few seconds of each other. A warning that an actor repeats all run long (Ray Train's
controller polling a state API that is not there: about a hundred times per job) is printed here once;
each later copy is counted, and the counts are printed once when the run ends. Lines that are not
warnings (raytron's own, the workers' prints, errors) pass unchanged.
"""

from __future__ import annotations

import logging
import re
import sys
import threading

WARNING = re.compile(r"\bWARN(ING)?\b|Warning:")
# What differs between copies of one warning: timestamps, pids, ids, counters, addresses.
VOLATILE = re.compile(r"0x[0-9a-fA-F]+|[0-9a-f]{16,}|\d+")
RAY_REPEATS = re.compile(r"\s*\[repeated (\d+)x across cluster\].*$")
HANDLER = "ray_print_logs"  # the name under which ray.init(log_to_driver=True) registers its printer


class WarningCollapser:
    """Counts warnings by their text with the volatile parts masked; says whether to print a line."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.first: dict[str, str] = {}
        self._lock = threading.Lock()

    def admit(self, line: str) -> bool:
        """True the first time a warning is seen (and for every line that is not a warning)."""
        if not WARNING.search(line) or line.lstrip().startswith("[raytron]"):
            return True
        repeats = RAY_REPEATS.search(line)
        text = RAY_REPEATS.sub("", line)
        key = VOLATILE.sub("#", text.split(" -- ", 1)[-1] if " -- " in text else text).strip()
        with self._lock:
            seen = key in self.counts
            self.counts[key] = self.counts.get(key, 0) + (int(repeats.group(1)) if repeats else 1)
            self.first.setdefault(key, text.strip())
        return not seen

    def summary(self) -> list[str]:
        """One line per warning seen more than once: how often, and its first copy (cut to 200 chars)."""
        with self._lock:
            return [f"[raytron] Ray printed this warning {n} times (shown once above): {self.first[k][:200]}"
                    for k, n in self.counts.items() if n > 1]


class _RecordFilter(logging.Filter):
    def __init__(self, collapser: WarningCollapser) -> None:
        super().__init__()
        self.collapser = collapser

    def filter(self, record: logging.LogRecord) -> bool:
        return self.collapser.admit(record.getMessage())


def install(collapser: WarningCollapser) -> bool:
    """Route the output Ray forwards from workers and actors, and this process's Ray log records, through
    `collapser` (replacing the collapser of an earlier run in this process). False when Ray forwards
    nothing here (log_to_driver off)."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    for handler in logging.getLogger("ray").handlers:  # handler filters also see the child loggers' records
        for old in [f for f in handler.filters if isinstance(f, _RecordFilter)]:
            handler.removeFilter(old)
        handler.addFilter(_RecordFilter(collapser))
    printer = dict(list(dispatcher.handlers)).get(HANDLER)
    if printer is None:
        return False
    printer = getattr(printer, "ray_printer", printer)

    def collapsed(data: dict) -> None:
        lines = [line for line in data.get("lines", []) if collapser.admit(line)]
        if lines:
            printer({**data, "lines": lines})

    collapsed.ray_printer = printer
    dispatcher.remove_handler(HANDLER)
    dispatcher.add_handler(HANDLER, collapsed)
    return True


def print_summary(collapser: WarningCollapser, out=None) -> None:
    for line in collapser.summary():
        print(line, file=out or sys.stderr, flush=True)
