"""Ray's repeated warnings collapse to one line and a count; everything else passes."""

from __future__ import annotations

import io

from raytron.launcher.ray_console import HANDLER, WarningCollapser, install, print_summary

STATE_API = ("{ts}\tWARNING controller.py:361 -- Failed to poll the state API at http://127.0.0.1:8265 "
             "(attempt {n}): the dashboard is not running")


def test_a_repeated_warning_is_printed_once_then_counted():
    c = WarningCollapser()
    lines = [STATE_API.format(ts=f"2026-01-01 10:00:{n % 60:02d},{n:03d}", n=n) for n in range(100)]
    admitted = [line for line in lines if c.admit(line)]
    assert admitted == lines[:1]
    assert c.admit(lines[0].replace("state API", "GCS")), "a different warning is printed"
    assert c.admit("[raytron] WARNING: step 3 loss spike") and c.admit("[raytron] WARNING: step 3 loss spike")
    assert all(c.admit("step 1 loss 3.2") for _ in range(3)), "non-warnings always pass"
    assert c.admit("UserWarning: x") and not c.admit("UserWarning: x [repeated 4x across cluster]")
    out = io.StringIO()
    print_summary(c, out)
    assert out.getvalue().splitlines() == [
        f"[raytron] Ray printed this warning 100 times (shown once above): {lines[0][:200]}",
        "[raytron] Ray printed this warning 5 times (shown once above): UserWarning: x"]


def test_install_filters_what_ray_forwards_to_the_driver():
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printed = []
    saved = list(dispatcher.handlers)
    dispatcher.handlers = [(HANDLER, lambda data: printed.append(data))]
    try:
        c = WarningCollapser()
        assert install(c) and install(c), "installing twice wraps Ray's printer once"
        batch = {"pid": 7, "is_err": True, "lines": [STATE_API.format(ts="t", n=1), "step 1 loss 3.2",
                                                      STATE_API.format(ts="u", n=2)]}
        dispatcher.emit(batch)
        dispatcher.emit({**batch, "lines": [STATE_API.format(ts="v", n=3)]})
    finally:
        dispatcher.handlers = saved
    assert [d["lines"] for d in printed] == [batch["lines"][:2]] and printed[0]["pid"] == 7
    assert "3 times" in c.summary()[0]
