"""launcher/study_measure.summarize_run: a family's training metrics from its step records."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from raytron import models
from raytron.launcher.study_measure import summarize_run


def _spec(steps: int = 3):
    return SimpleNamespace(train=SimpleNamespace(steps=steps, global_batch_size=4, seq_len=32),
                           resources=SimpleNamespace(workers=1), run_dir=SimpleNamespace(metrics="metrics.jsonl"))


def _records(memory_key: str, peaks: list[float]) -> list[dict]:
    out = [{"step": i + 1, "loss": 5.0 - i, "tokens_per_sec": 100.0 * (i + 1), memory_key: peak}
           for i, peak in enumerate(peaks)]
    out[-1]["val_loss"] = 2.0
    return out


@pytest.mark.parametrize("key", ["memory/max_allocated_gib", "memory/rss_peak_gib"])
def test_peak_memory_is_the_highest_step_peak_the_records_carry(key):
    got = summarize_run(_spec(), models.get_config("dense", "debug"), _records(key, [0.5, 1.5, 1.0]),
                        (100, 400), None)
    assert got["train_peak_mem_bytes"] == 1.5 * 2**30
    assert got["tokens_per_s"] == 250.0 and got["perplexity"] == math.exp(2.0)
    assert got["bits_per_byte"] == pytest.approx(2.0 * 100 / math.log(2) / 400)


def test_records_without_the_final_validation_loss_are_refused():
    records = _records("memory/rss_peak_gib", [1.0, 1.0, 1.0])
    del records[-1]["val_loss"]
    with pytest.raises(ValueError, match="final step 3"):
        summarize_run(_spec(), models.get_config("dense", "debug"), records, (100, 400), None)
