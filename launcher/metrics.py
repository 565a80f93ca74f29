"""Metrics: TensorBoard scalars under the run's storage and a console progress line.

One writer on one rank (the caller decides which). TensorBoard's writer needs a local directory, so
for remote run URIs events go to a local staging directory and are copied to `<run>/tensorboard/`
on every flush. After a resume, `purge_step` makes TensorBoard drop events of steps that the resumed
run is about to redo, so step indices never repeat.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

import fsspec


def _local_path(uri: str) -> str | None:
    fs, path = fsspec.core.url_to_fs(uri)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return path if "file" in protocols or "local" in protocols else None


class MetricsWriter:
    def __init__(self, tb_uri: str, start_step: int, total_steps: int):
        from torch.utils.tensorboard import SummaryWriter

        self.tb_uri = tb_uri.rstrip("/")
        local = _local_path(self.tb_uri)
        self._staging = None if local else tempfile.mkdtemp(prefix="raytron-tb-")
        logdir = local or self._staging
        os.makedirs(logdir, exist_ok=True)
        self.writer = SummaryWriter(log_dir=logdir, purge_step=start_step + 1 if start_step else None)
        self.start_step, self.total_steps = start_step, total_steps
        self._t0 = time.monotonic()
        self.jsonl_uri = self.tb_uri.rsplit("/", 1)[0] + "/metrics.jsonl"
        self._records = self._kept_records(start_step)

    def _kept_records(self, start_step: int) -> list[str]:
        """Lines of metrics.jsonl up to the resumed step (later ones are about to be redone)."""
        fs, path = fsspec.core.url_to_fs(self.jsonl_uri)
        if not fs.exists(path):
            return []
        lines = fs.cat_file(path).decode().splitlines()
        return [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= start_step]

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            if value is not None:
                self.writer.add_scalar(key, value, step)

    def record(self, step: int, values: dict) -> None:
        """Full-precision metrics of one step, for `metrics.jsonl` (exact comparisons, scripts)."""
        self._records.append(json.dumps({"step": step, **values}))

    def annotate(self, step: int, values: dict) -> None:
        """Add `values` to the record of `step` (e.g. checkpoint timings known after the step)."""
        for i in range(len(self._records) - 1, -1, -1):
            rec = json.loads(self._records[i])
            if rec["step"] == step:
                self._records[i] = json.dumps({**rec, **values})
                return
        self.record(step, values)

    def flush(self) -> None:
        self.writer.flush()
        fs, path = fsspec.core.url_to_fs(self.jsonl_uri)
        fs.pipe_file(path, ("\n".join(self._records) + "\n").encode() if self._records else b"")
        if self._staging:
            fs, root = fsspec.core.url_to_fs(self.tb_uri)
            fs.put(self._staging.rstrip("/") + "/", root, recursive=True)

    def close(self) -> None:
        self.flush()
        self.writer.close()

    def progress(self, step: int, m: dict[str, float]) -> str:
        """One console line: step, loss, tokens/s, ETA."""
        done = step - self.start_step
        elapsed = time.monotonic() - self._t0
        eta = elapsed / max(done, 1) * (self.total_steps - step)
        parts = [f"step {step}/{self.total_steps}", f"loss {m['loss']:.4f}"]
        if m.get("val_loss") is not None:
            parts.append(f"val_loss {m['val_loss']:.4f}")
        parts += [f"lr {m['lr']:.2e}", f"grad_norm {m['grad_norm']:.3f}",
                  f"tokens/s {m['tokens_per_sec']:,.0f}", f"ETA {_fmt_time(eta)}"]
        return " | ".join(parts)


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
