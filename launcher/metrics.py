"""Metrics: TensorBoard scalars under the run's storage and a console progress line.

One writer on one rank (the caller decides which). TensorBoard's writer needs a local directory, so
for remote run URIs events go to a local staging directory and are copied to `<run>/tensorboard/`
on every flush. After a resume, `purge_step` makes TensorBoard drop events of steps that the resumed
run is about to redo, so step indices never repeat.

MFU = model FLOPs per token (models/flops.py, Megatron's convention: fwd + bwd = 3 x forward matmuls,
causal attention halved, MoE active experts only) x tokens/s per device / the device's dense bf16 peak
(DENSE_BF16_PEAK, looked up by GPU name). Without a known peak (CPU, an unlisted GPU) MFU is absent
(None, not logged) and only the achieved model TFLOP/s per device is reported.
Peak memory per logging interval: CUDA's max allocated / reserved bytes since the last log; on CPU the
worker process's resident-set high-water mark (getrusage; it cannot be reset, so it covers the run).
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from .. import storage
from ..run_dir import RunDir

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, from the vendors' datasheets; the first name
# that occurs in torch.cuda.get_device_name() wins, so variants come before their family.
DENSE_BF16_PEAK: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("GH200", 989e12), ("H200", 989e12), ("H100", 989e12),
    ("H800", 989e12), ("H20", 148e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12),
    ("L40S", 362e12), ("A10G", 70e12),
)


def device_peak_flops(device_name: str | None) -> float | None:
    """Dense bf16 peak FLOP/s of the GPU named `device_name`; None for CPU (None) or an unlisted GPU."""
    if not device_name:
        return None
    return next((peak for key, peak in DENSE_BF16_PEAK if key in device_name), None)


def model_flops_rate(flops_per_token: float, tokens_per_sec: float, devices: int) -> float:
    """Achieved model FLOP/s per device: the global tokens/s spread over `devices`."""
    return flops_per_token * tokens_per_sec / devices


def mfu(flops_per_token: float, tokens_per_sec: float, devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilization (fraction of `peak`), None when the peak is unknown."""
    return None if peak is None else model_flops_rate(flops_per_token, tokens_per_sec, devices) / peak


def peak_memory_gib(cuda: bool) -> dict[str, float]:
    """Peak memory since the last call (CUDA: allocated and reserved, then reset) or, on CPU, the
    process's RSS high-water mark, in GiB."""
    import torch

    if cuda:
        out = {"memory/max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
               "memory/max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
        torch.cuda.reset_peak_memory_stats()
        return out
    import resource

    return {"memory/rss_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30}


def recorded_peak_gib(record: dict) -> float | None:
    """The peak memory a step record carries (peak_memory_gib's keys: CUDA allocated, else CPU RSS), or None."""
    value = record.get("memory/max_allocated_gib", record.get("memory/rss_peak_gib"))
    return value if isinstance(value, (int, float)) else None


class MetricsWriter:
    def __init__(self, run: RunDir, start_step: int, total_steps: int):
        from torch.utils.tensorboard import SummaryWriter

        self.tb_uri, self.jsonl_uri = run.tensorboard, run.metrics
        local = storage.local_path(self.tb_uri)
        self._staging = None if local else tempfile.mkdtemp(prefix="raytron-tb-")
        logdir = local or self._staging
        os.makedirs(logdir, exist_ok=True)
        self.writer = SummaryWriter(log_dir=logdir, purge_step=start_step + 1 if start_step else None)
        self.start_step, self.total_steps = start_step, total_steps
        self._t0 = time.monotonic()
        self._records = self._kept_records(start_step)

    def _kept_records(self, start_step: int) -> list[str]:
        """Lines of metrics.jsonl up to the resumed step (later ones are about to be redone)."""
        if not storage.exists(self.jsonl_uri):
            return []
        lines = storage.read_bytes(self.jsonl_uri).decode().splitlines()
        return [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= start_step]

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            if value is not None:
                self.writer.add_scalar(key, value, step)

    def moe(self, step: int, expert_load: list[float] | None, expert_bias: list[list[float]] | None) -> None:
        """Per-expert MoE statistics: `moe/expert_load/<e>` (share of the step's assignments, summed over
        layers); for routers with the aux-loss-free bias, `moe/expert_bias/<e>` (mean over layers),
        `moe/expert_bias_absmax` and one histogram of each layer's biases (`moe/expert_bias_layer<l>`)."""
        for i, v in enumerate(expert_load or []):
            self.writer.add_scalar(f"moe/expert_load/{i}", v, step)
        if not expert_bias:
            return
        import torch

        bias = torch.tensor(expert_bias, dtype=torch.float64)  # [MoE layers, experts]
        for i, v in enumerate(bias.mean(0).tolist()):
            self.writer.add_scalar(f"moe/expert_bias/{i}", v, step)
        self.writer.add_scalar("moe/expert_bias_absmax", float(bias.abs().max()), step)
        for layer, row in enumerate(bias):
            self.writer.add_histogram(f"moe/expert_bias_layer{layer}", row, step)

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
        text = "\n".join(self._records) + "\n" if self._records else ""
        storage.write_bytes_atomic(self.jsonl_uri, text.encode())
        if self._staging:
            storage.upload_dir(self._staging, self.tb_uri)

    def close(self) -> None:
        self.flush()
        self.writer.close()

    def progress(self, step: int, m: dict[str, float]) -> str:
        """One console line: step, loss, tokens/s, MFU (or model TFLOP/s), peak memory, ETA."""
        done = step - self.start_step
        elapsed = time.monotonic() - self._t0
        eta = elapsed / max(done, 1) * (self.total_steps - step)
        parts = [f"step {step}/{self.total_steps}", f"loss {m['loss']:.4f}"]
        if m.get("val_loss") is not None:
            parts.append(f"val_loss {m['val_loss']:.4f}")
        parts += [f"lr {m['lr']:.2e}", f"grad_norm {m['grad_norm']:.3f}",
                  f"tokens/s {m['tokens_per_sec']:,.0f}"]
        if m.get("mfu") is not None:
            parts.append(f"MFU {m['mfu']:.1%}")
        elif m.get("model_tflops_per_device") is not None:
            parts.append(f"model TFLOP/s {m['model_tflops_per_device']:.3g}")
        mem = recorded_peak_gib(m)
        if mem is not None:
            parts.append(f"mem {mem:.2f} GiB")
        if m.get("moe/router_entropy") is not None:
            parts.append(f"router H {m['moe/router_entropy']:.3f} load max/mean {m['moe/load_max_over_mean']:.2f}")
        parts.append(f"ETA {_fmt_time(eta)}")
        return " | ".join(parts)


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
