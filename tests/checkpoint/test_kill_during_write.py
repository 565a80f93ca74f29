"""A rank SIGKILLed while it writes its shard: no marker, and resume uses the previous step.

Real processes over gloo on file:// and s3:// (memory:// is per-process, so it cannot be shared).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

from tests.checkpoint.ckpt_helpers import _rank_main, free_port
from tests.checkpoint.kill_ranks import rank_state, saving_rank
from raytron import storage
from raytron.parallelism.checkpoint import MARKER, MANIFEST, CheckpointStore

pytestmark = pytest.mark.slow


def _wait_for(path, procs, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"rank 1 never reached its shard write ({path})"
        assert all(p.exitcode in (None, 0) for p in procs), f"a rank died early: {[p.exitcode for p in procs]}"
        time.sleep(0.2)


def test_sigkill_during_shard_write_leaves_no_marker(shared_ckpt_uri, tmp_path):
    flag = str(tmp_path / "rank1-writing")
    ctx, port = mp.get_context("spawn"), free_port()
    procs = [ctx.Process(target=_rank_main, args=(saving_rank, r, 2, port, (shared_ckpt_uri, flag)), daemon=True)
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        _wait_for(flag, procs, timeout=180)
        os.kill(procs[1].pid, signal.SIGKILL)
        procs[1].join(30)
        procs[0].join(20)  # rank 0 sees its peer vanish (gloo error) or is torn down like Ray would
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(10)
    assert procs[1].exitcode == -signal.SIGKILL
    store = CheckpointStore(shared_ckpt_uri, keep=2)
    step2 = store.step_path(2)
    assert storage.exists(f"{step2}/state-00001.pt"), "the half-written shard is there ..."
    assert not storage.exists(f"{step2}/{MARKER}"), "step 2: a killed save must leave no COMMITTED marker"
    assert not storage.exists(f"{step2}/{MANIFEST}"), "step 2: rank 0 must not write the manifest"
    chosen, skipped = store.latest(deep=True)
    assert chosen is not None and chosen.step == 1 and skipped == [], (chosen, skipped)
    for r in range(2):
        shard = store.read_shard(1, f"state-{r:05d}.pt", chosen.manifest)
        assert torch.equal(shard["params"][f"w{r}"], rank_state(1, r)["params"][f"w{r}"])
    # the resumed run saves step 2 again over the leftovers, and that one commits and verifies
    records = [store.write_shard(2, f"state-{r:05d}.pt", rank_state(2, r)) for r in range(2)]
    store.commit(2, records, {"engine": "test"})
    assert store.latest(deep=True)[0].step == 2


def test_write_error_on_one_rank_fails_the_save_on_every_rank(tmp_path):
    from tests.checkpoint.ckpt_helpers import spawn_ranks
    from tests.checkpoint.kill_ranks import failing_write_rank

    uri, out = f"file://{tmp_path}/ckpt", str(tmp_path / "error")
    spawn_ranks(failing_write_rank, 2, uri, out, timeout=120)
    errors = [json.loads((tmp_path / f"error.{r}").read_text()) for r in range(2)]
    assert errors[0] == errors[1] and errors[0] is not None, errors
    assert "step 3: rank 1 could not write state-00001.pt: OSError" in errors[0], errors[0]
    assert CheckpointStore(uri).committed_steps() == [], "no marker after a failed write"
