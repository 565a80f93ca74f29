"""What a study measures besides training: a family's forward+backward throughput and peak memory per
context length, the UTF-8 bytes behind the evaluated validation tokens (bits per byte), and the
per-family summary of a finished run's metrics.jsonl.

Timing follows benchmarks/models/bench_hybrid_vs_attention.py: warm-ups, then the median of timed
forward+backward passes (synchronized on CUDA). Here the whole model runs (embedding and logits
included) with a cross-entropy loss, on the same tokens per pass at every context (`sweep.tokens`).
"""

from __future__ import annotations

import json
import math
import time
import weakref

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .. import storage
from ..models.config import ModelConfig
from ..models.flops import flops_per_token
from ..models.transformer import Transformer
from ..run_dir import RunDir
from .metrics import recorded_peak_gib

# Dense bf16 tensor-core peak FLOP/s per device name substring, for MFU when the run's metrics lack one.
PEAK_BF16 = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12}


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of live tensor storages created under it; `peak` is the high-water mark. Sees every tensor
    an aten op creates and when its storage is freed, without allocator caching (CPU peak memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key)
        return out


def _step(model: torch.nn.Module, tokens: torch.Tensor) -> None:
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())
    aux = model.aux_losses()
    (loss + 0.01 * sum(aux) if aux else loss).backward()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_context(model: torch.nn.Module, cfg: ModelConfig, seq: int, batch: int, sweep, device: torch.device
                    ) -> dict:
    """Median seconds of one forward+backward of `batch` sequences at context `seq`, tokens/s and peak memory
    in bytes (CUDA: max allocated, parameters included; CPU: live tensor storage created during the pass plus
    the parameters)."""
    gen = torch.Generator().manual_seed(seq)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen).to(device)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    times = []
    try:
        if device.type == "cuda":  # every pass is the same computation: the timed ones give the peak too
            torch.cuda.reset_peak_memory_stats(device)
        for i in range(sweep.warmup + sweep.repeats):
            model.zero_grad(set_to_none=True)
            _sync(device)
            start = time.perf_counter()
            _step(model, tokens)
            _sync(device)
            if i >= sweep.warmup:
                times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
        else:
            with LiveTensorBytes() as mem:
                _step(model, tokens)
            peak = params + mem.peak
    except torch.OutOfMemoryError:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return {"seq": seq, "batch": batch, "error": "out of memory"}
    except RuntimeError as exc:  # e.g. a kernel that cannot compile at this length: the other contexts still run
        model.zero_grad(set_to_none=True)
        return {"seq": seq, "batch": batch, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"}
    model.zero_grad(set_to_none=True)
    seconds = sorted(times)[len(times) // 2]
    return {"seq": seq, "batch": batch, "seconds": seconds, "tokens_per_s": batch * seq / seconds,
            "peak_mem_bytes": peak, "flops_per_token": flops_per_token(cfg, seq)["total"]}


def sweep_family(cfg: ModelConfig, seqs: list[int], sweep, mode: str, threads: int, seed: int) -> list[dict]:
    """Throughput/memory rows of one family's model at each context in `seqs`."""
    device = torch.device("cuda" if mode == "gpu" else "cpu")
    old_threads = torch.get_num_threads()
    if mode == "cpu":
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        model = Transformer(cfg).to(device)
        if mode == "gpu":
            model = model.bfloat16()
        return [measure_context(model, cfg, seq, sweep.batch(seq, max(seqs)), sweep, device) for seq in seqs]
    finally:
        torch.set_num_threads(old_threads)
        if mode == "gpu":
            torch.cuda.empty_cache()


def validation_bytes(spec) -> tuple[int, int]:
    """(target tokens, UTF-8 bytes they decode to) of the validation samples the worker evaluates at the
    end of training (launcher/worker.evaluate: the first eval_batches global batches), every target
    token counted as the loss counts it. Each sample decodes on its own, as the loss sees it."""
    from ..data_pipeline import get_tokenizer, prepare_for_job

    data = prepare_for_job(spec.data, seq_len=spec.train.seq_len, seed=spec.train.seed, cache_uri=spec.data_cache_uri)
    tok = get_tokenizer(spec.data.tokenizer)
    gbs, tokens, nbytes = spec.train.global_batch_size, 0, 0
    for i in range(spec.train.eval_batches):
        batch = data.valid.global_batch(i * gbs, gbs)
        for row in batch[:, 1:].numpy():
            tokens += len(row)
            nbytes += len(tok.decode(row).encode("utf-8"))
    return tokens, nbytes


def read_metrics(run_uri: str) -> list[dict]:
    path = RunDir(run_uri).metrics
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_bytes(path).decode().splitlines() if line.strip()]


def summarize_run(spec, cfg: ModelConfig, records: list[dict], val: tuple[int, int], device_name: str | None) -> dict:
    """Per-family training metrics from its metrics.jsonl: final validation loss, perplexity, bits per
    byte, mean training tokens/s over the steps after the first (which includes start-up),
    MFU and peak memory when recorded (GPU MFU computed from models/flops.py when not)."""
    steps = sorted({r["step"]: r for r in records}.values(), key=lambda r: r["step"])
    if not steps or steps[-1]["step"] != spec.train.steps or steps[-1].get("val_loss") is None:
        raise ValueError(f"{spec.run_dir.metrics} does not end with the final step "
                         f"{spec.train.steps} and its validation loss")
    tokens_per_step = spec.train.global_batch_size * spec.train.seq_len
    timed = [r["tokens_per_sec"] for r in steps[1:]] or [steps[0]["tokens_per_sec"]]
    tps = sum(timed) / len(timed)
    val_loss = steps[-1]["val_loss"]
    n_tokens, n_bytes = val
    mfu = [r["mfu"] for r in steps if isinstance(r.get("mfu"), (int, float))]
    if mfu:
        mfu_value = sum(mfu) / len(mfu)
    else:
        peak = next((v for k, v in PEAK_BF16.items() if device_name and k in device_name), None)
        world = spec.resources.workers
        mfu_value = flops_per_token(cfg, spec.train.seq_len)["total"] * tps / (peak * world) if peak else None
    mem = [gib * 2**30 for gib in map(recorded_peak_gib, steps) if gib is not None]
    return {
        "val_loss": val_loss, "perplexity": math.exp(val_loss),
        "bits_per_byte": val_loss * n_tokens / math.log(2) / n_bytes,
        "train_tokens": tokens_per_step * spec.train.steps, "tokens_per_s": tps, "mfu": mfu_value,
        "train_peak_mem_bytes": max(mem) if mem else None,
        "loss_curve": [[r["step"] * tokens_per_step, r["loss"]] for r in steps],
    }
