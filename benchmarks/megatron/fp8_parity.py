"""Loss parity of train.precision fp8 vs bf16 in the megatron engine, one GPU.

Trains the same model twice in one process, bf16 then fp8, from the same reference init (same seed) on the
same token stream, and writes to --out:
  fp8_parity_<gpu>.json  both loss curves, final losses (mean of the last --tail steps), held-out losses
                         and the relative gaps, the config, the step times;
  fp8_parity_<gpu>.png   both curves and their relative difference.
The text is real (not random tokens): UTF-8 bytes (data_pipeline's ByteTokenizer, so nothing to
download) of the files under --text, one document each, EOD-separated, read in sorted order; by default
this Python's standard library sources (prose docstrings and comments as well as code, ~30 MB here and on
the GPU image alike) and the repository's own docs. The last --eval-batches windows are held out.
Model: dense/1b at --layers depth (full width), vocabulary cut to the byte tokenizer's 264 ids.

    python benchmarks/megatron/fp8_parity.py --steps 600 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import sysconfig
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_throughput import make_spec  # noqa: E402

from raytron.data_pipeline.tokenizer import ByteTokenizer  # noqa: E402
from raytron.parallelism.layout import ParallelLayout  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]


def token_stream(roots: list[str], max_tokens: int) -> np.ndarray:
    """Bytes of every .py/.md/.txt/.rst file under `roots` (sorted), EOD after each, up to max_tokens."""
    tok, parts, total = ByteTokenizer(), [], 0
    for root in roots:
        files = [pathlib.Path(root)] if pathlib.Path(root).is_file() else sorted(
            p for p in pathlib.Path(root).rglob("*") if p.suffix in (".py", ".md", ".txt", ".rst") and p.is_file())
        for path in files:
            ids = tok.encode(path.read_text(encoding="utf-8", errors="replace"))
            parts.append(np.append(ids, tok.eod_id).astype(np.int64))
            total += len(parts[-1])
            if total >= max_tokens:
                return np.concatenate(parts)[:max_tokens]
    raise SystemExit(f"--text {roots}: {total} tokens, the run needs {max_tokens}: give more text or fewer steps")


def windows(stream: np.ndarray, seq: int, count: int, start: int) -> list[torch.Tensor]:
    """`count` consecutive windows of seq + 1 tokens (inputs + shifted labels), from window `start` on."""
    return [torch.from_numpy(stream[(start + i) * (seq + 1):(start + i + 1) * (seq + 1)].copy()) for i in range(count)]


def train(precision: str, args, stream: np.ndarray) -> dict:
    from megatron.core import parallel_state

    from raytron.parallelism.megatron.engine import MegatronEngine

    overrides = {"num_layers": args.layers, "vocab_size": ByteTokenizer.vocab_size}
    spec = make_spec("dense", "1b", overrides, args.batch, args.batch, precision=precision)
    spec.train.seq_len, spec.train.steps, spec.train.lr = args.seq, args.steps, args.lr
    spec.train.min_lr, spec.train.warmup_steps = args.lr / 10, args.warmup
    layout = ParallelLayout(world_size=1, micro_batch_size=args.batch, global_batch_size=args.batch)
    engine = MegatronEngine(spec, layout, 0, 1, init_from_reference=True)
    losses, times = [], []
    for step in range(args.steps):
        batch = torch.stack(windows(stream, args.seq, args.batch, step * args.batch))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses.append(engine.train_step([batch]).loss)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"[{precision}] step {step} loss {losses[-1]:.4f} ({times[-1]:.3f} s)", flush=True)
    held_out = [torch.stack(windows(stream, args.seq, args.batch, (args.steps + i) * args.batch))
                for i in range(args.eval_batches)]
    eval_loss = float(np.mean([engine.eval_loss([b]) for b in held_out]))
    del engine
    parallel_state.destroy_model_parallel()
    torch.cuda.empty_cache()
    return {"losses": losses, "step_s_median": float(np.median(times[5:] or times)), "eval_loss": eval_loss}


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bf16, fp8 = (np.array(result["runs"][p]["losses"]) for p in ("bf16", "fp8"))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=(3, 1))
    for name, curve in (("bf16", bf16), ("fp8", fp8)):
        top.plot(curve, label=f"{name} (final {result['final_loss'][name]:.4f})", linewidth=0.8)
    top.set_ylabel("training loss (nats/byte)")
    top.set_yscale("log")
    top.legend()
    top.set_title(f"dense/1b x {result['config']['layers']} layers, {result['gpu']}: fp8 vs bf16")
    bottom.plot((fp8 - bf16) / bf16, linewidth=0.6, color="k")
    bottom.axhline(0, color="grey", linewidth=0.5)
    bottom.set_ylabel("(fp8 - bf16) / bf16")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--layers", type=int, default=8, help="dense/1b depth (32 is the full model)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=16, help="sequences per step (one micro-batch)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--tail", type=int, default=50, help="final loss = mean of the last this many steps")
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--text", nargs="+", default=[sysconfig.get_paths()["stdlib"], str(REPO / "docs"),
                                                      str(REPO / "README.md")])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", "29517")):
        os.environ.setdefault(key, value)
    torch.cuda.set_device(0)
    need = (args.steps + args.eval_batches) * args.batch * (args.seq + 1)
    stream = token_stream(args.text, need)
    runs = {p: train(p, args, stream) for p in ("bf16", "fp8")}
    final = {p: float(np.mean(r["losses"][-args.tail:])) for p, r in runs.items()}
    gpu = torch.cuda.get_device_name()
    result = {
        "gpu": gpu, "torch": torch.__version__, "command": " ".join(sys.argv),
        "config": {k: v for k, v in vars(args).items() if k not in ("out",)}, "tokens_per_step": args.batch * args.seq,
        "final_loss": final, "final_gap_rel": (final["fp8"] - final["bf16"]) / final["bf16"],
        "eval_loss": {p: r["eval_loss"] for p, r in runs.items()},
        "eval_gap_rel": (runs["fp8"]["eval_loss"] - runs["bf16"]["eval_loss"]) / runs["bf16"]["eval_loss"],
        "speedup_step": runs["bf16"]["step_s_median"] / runs["fp8"]["step_s_median"], "runs": runs}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"fp8_parity_{gpu.replace(' ', '_')}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    plot(result, out / f"{stem}.png")
    print(f"final loss bf16 {final['bf16']:.4f} fp8 {final['fp8']:.4f} gap {result['final_gap_rel']:+.2%}; "
          f"held-out gap {result['eval_gap_rel']:+.2%}; step speedup {result['speedup_step']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
