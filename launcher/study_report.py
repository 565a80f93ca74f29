"""A study's outputs: results.json, report.md (tables and the survey's three claims judged against the
measurements) and PNG plots (loss vs tokens; bits per byte vs tokens/s; tokens/s vs context)."""

from __future__ import annotations

import json
import math
import os

from .study_config import FAMILIES

CONFIRMED, NOT_CONFIRMED, NOT_MEASURABLE = "confirmed", "not confirmed", "not measurable here"
LINEAR = ("gated_deltanet", "mamba2")
SPARSE = ("sliding_window", "block_sparse")
EFFICIENT = ("moe", "gdn_hybrid", "mamba2_hybrid", "moe_hybrid")
BASELINE = "full_attention"


def _scaling(fam: dict) -> float | None:
    """Time-per-token growth from the shortest to the longest swept context (1.0: linear cost in N)."""
    rows = [r for r in fam["sweep"] if "seconds" in r]
    if len(rows) < 2:
        return None
    lo, hi = rows[0], rows[-1]
    return lo["tokens_per_s"] / hi["tokens_per_s"]  # a pass may hold several sequences: not seconds / seq


def _longest(fam: dict) -> dict | None:
    rows = [r for r in fam["sweep"] if "seconds" in r]
    return rows[-1] if rows else None


def _quality_gate(results: dict, study) -> str | None:
    tokens = min(f["train_tokens"] for f in results["families"].values())
    if tokens < study.claims.min_train_tokens:
        return (f"Each family trained on {tokens:,} tokens, below claims.min_train_tokens="
                f"{study.claims.min_train_tokens:,}: perplexity gaps at this budget do not speak for pretraining")
    return None


def claim_linear(results: dict, study) -> tuple[str, str]:
    fams, base = results["families"], results["families"].get(BASELINE)
    present = [n for n in LINEAR if n in fams]
    if base is None or not present:
        return NOT_MEASURABLE, f"needs {BASELINE} and one of {', '.join(LINEAR)} in the study"
    parts, ok, any_linear = [], True, False
    for name in present:
        gap = fams[name]["perplexity"] / base["perplexity"] - 1
        growth = _scaling(fams[name])
        any_linear = any_linear or growth is None or growth <= 1.5
        parts.append(f"{name}: perplexity {gap:+.2%} vs {BASELINE}, time/token x{growth:.2f} from "
                     f"{fams[name]['sweep'][0]['seq']} to {fams[name]['sweep'][-1]['seq']} tokens"
                     if growth is not None else f"{name}: perplexity {gap:+.2%} vs {BASELINE}")
        ok = ok and gap < 0.01 and (growth is None or growth <= 1.5)
    gate = _quality_gate(results, study)
    base_growth = _scaling(base)
    detail = "; ".join(parts) + (f"; {BASELINE} time/token x{base_growth:.2f}" if base_growth else "")
    detail += " (criteria: perplexity gap < 1% and time/token growth <= 1.5x over the swept contexts)"
    if gate:  # the cost half alone can still refute the claim
        return (NOT_MEASURABLE if any_linear else NOT_CONFIRMED), f"{gate}. Measured: {detail}"
    return (CONFIRMED if ok else NOT_CONFIRMED), detail


def claim_sparse(results: dict, study) -> tuple[str, str]:
    fams, base = results["families"], results["families"].get(BASELINE)
    present = [n for n in SPARSE if n in fams]
    if base is None or not present or _longest(base) is None:
        return NOT_MEASURABLE, f"needs {BASELINE} and one of {', '.join(SPARSE)} in the study"
    ref = _longest(base)
    parts, best = [], 0.0
    for name in present:
        row = _longest(fams[name])
        if row is None or row["seq"] != ref["seq"]:
            continue
        speedup = row["tokens_per_s"] / ref["tokens_per_s"]
        best = max(best, speedup)
        parts.append(f"{name} {speedup:.2f}x {BASELINE}'s forward+backward tokens/s at {row['seq']} tokens")
    if not parts:
        return NOT_MEASURABLE, "no sparse family was measured at the longest context"
    device = results["machine"]["device"]
    detail = "; ".join(parts) + f" (criterion: >= 2x at the longest swept context; device {device}, reference " \
                                "attention computes masked scores densely unless a sparse kernel is used)"
    return (CONFIRMED if best >= 2.0 else NOT_CONFIRMED), detail


def claim_throughput(results: dict, study) -> tuple[str, str]:
    fams, base = results["families"], results["families"].get(BASELINE)
    present = [n for n in EFFICIENT if n in fams]
    if base is None or not present:
        return NOT_MEASURABLE, f"needs {BASELINE} and one of {', '.join(EFFICIENT)} in the study"
    parts, ok, any_fast = [], True, False
    for name in present:
        ratio = fams[name]["tokens_per_s"] / base["tokens_per_s"]
        any_fast = any_fast or ratio >= 1.5
        gap = fams[name]["perplexity"] / base["perplexity"] - 1
        parts.append(f"{name}: training tokens/s {ratio:.2f}x, perplexity {gap:+.2%}")
        ok = ok and ratio >= 1.5 and abs(gap) <= study.claims.comparable_ppl
    detail = "; ".join(parts) + (
        f" vs {BASELINE} at train.seq_len {results['base']['train']['seq_len']} (criteria: >= 1.5x tokens/s and "
        f"perplexity within {study.claims.comparable_ppl:.0%}, every family)")
    ref = _longest(base)
    longest = [(n, _longest(fams[n])) for n in present]
    longest = [f"{n} {row['tokens_per_s'] / ref['tokens_per_s']:.2f}x" for n, row in longest
               if ref and row and row["seq"] == ref["seq"]]
    if longest:  # where linear-cost layers pay off; reported beside the criterion, not judged
        detail += f"; forward+backward at {ref['seq']} tokens: {', '.join(longest)}"
    gate = _quality_gate(results, study)
    if gate:  # no family reaching the speed-up refutes the claim whatever the perplexities
        return (NOT_MEASURABLE if any_fast else NOT_CONFIRMED), f"{gate}. Measured: {detail}"
    return (CONFIRMED if ok else NOT_CONFIRMED), detail


def _fmt_bytes(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def _fmt_opt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def render_report(results: dict, study) -> str:
    fams = results["families"]
    b = results["base"]
    lines = [f"# Efficient-architecture study ({study.mode})", "",
             f"Command: `{results['command']}`", "",
             f"Machine: {results['machine']['device']} on {results['machine']['host']} "
             f"({results['machine']['cpus']} CPUs, torch {results['machine']['torch']}). "
             f"Base job: engine {b['engine']}, "
             f"{b['train']['steps']} steps x {b['train']['global_batch_size']} x {b['train']['seq_len']} tokens, "
             f"tokenizer {b['data']['tokenizer']}, {b['resources']['workers']} worker(s). Every family has "
             f"{study.layers} layers and is sized to {study.target_active_params:,} active parameters "
             f"(tolerance {study.tolerance:.0%}). Bits per byte: {results['validation']['tokens']:,} validation "
             f"tokens = {results['validation']['bytes']:,} UTF-8 bytes.", "",
             "## Quality and training cost", "",
             "| family | pattern | dim | active / total params | val loss | ppl | bits/byte | tokens/s | MFU "
             "| peak mem (sweep pass @ seq_len) | wall |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, f in fams.items():
        lines.append(f"| {name} | `{FAMILIES[name][0]}` x{len(f['pattern']) // len(FAMILIES[name][0])} | "
                     f"{f['model']['dim']} | {f['active_params']:,} / {f['total_params']:,} ({f['active_gap']:+.1%}) | "
                     f"{f['val_loss']:.4f} | {f['perplexity']:.2f} | {f['bits_per_byte']:.4f} | "
                     f"{f['tokens_per_s']:,.0f} | "
                     f"{_fmt_opt(f['mfu'], '.1%')} | {_fmt_bytes(f['peak_mem_bytes'])} | {f['wall_s']:.0f} s |")
    if study.mode == "cpu":
        lines += ["", "MFU is n/a on CPU (no meaningful peak FLOP/s)."]
    if results.get("failed"):
        lines += ["", "## Failed families (not measured, not judged)", "", "| family | wall | error |", "|---|---|---|"]
        for name, f in results["failed"].items():
            error = " ".join(f["error"].split()).replace("|", "\\|")
            lines.append(f"| {name} | {_fmt_opt(f['wall_s'], '.0f')} s | {error[:400]} |")
    seqs = list(study.contexts)
    tokens = study.sweep.tokens or max(seqs)
    lines += ["", f"## Forward+backward throughput by context (tokens/s; peak memory), {tokens:,} tokens per pass", "",
              "| family | " + " | ".join(str(s) for s in seqs) + " |", "|---|" + "---|" * len(seqs)]
    for name, f in fams.items():
        cells = [f"{r['tokens_per_s']:,.0f} ({_fmt_bytes(r['peak_mem_bytes'])})" if "seconds" in r else r["error"]
                 for r in f["sweep"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## The survey's claims", ""]
    for title, (status, detail) in results["claims"].items():
        lines += [f"- **{title}**: {status}. {detail}.", ""]
    lines += ["Plots: `loss_vs_tokens.png`, `bpb_vs_tokens_per_s.png`, `tokens_per_s_vs_context.png`.", ""]
    return "\n".join(lines)


def write_plots(out: str, results: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = results["families"]
    paths = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=110)
        plt.close(fig)
        paths.append(name)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, f in fams.items():
        xs, ys = zip(*f["loss_curve"])
        ax.plot(xs, ys, label=name)
    ax.set(xlabel="training tokens", ylabel="training loss (nats/token)", title="Loss vs tokens")
    ax.legend(fontsize=7)
    save(fig, "loss_vs_tokens.png")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, f in fams.items():
        ax.scatter(f["tokens_per_s"], f["bits_per_byte"])
        ax.annotate(name, (f["tokens_per_s"], f["bits_per_byte"]), fontsize=7)
    ax.set(xlabel="training tokens/s", ylabel="validation bits per byte", title="Quality vs speed")
    save(fig, "bpb_vs_tokens_per_s.png")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, f in fams.items():
        rows = [r for r in f["sweep"] if "seconds" in r]
        ax.plot([r["seq"] for r in rows], [r["tokens_per_s"] for r in rows], marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="forward+backward tokens/s",
           title="Throughput vs context")
    ax.legend(fontsize=7)
    save(fig, "tokens_per_s_vs_context.png")
    return paths


def write_outputs(out: str, results: dict, study) -> None:
    results["claims"] = {
        "linear-complexity models: O(N) cost with < 1% perplexity loss": claim_linear(results, study),
        "sparse attention: 2-4x speed-up on long sequences": claim_sparse(results, study),
        "MoE and hybrids: 1.5-3x token throughput at comparable perplexity": claim_throughput(results, study),
    }
    results["plots"] = write_plots(out, results)
    bad = [f"{n}.{k}" for n, f in results["families"].items() for k, v in f.items()
           if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        results["non_finite"] = bad
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    with open(os.path.join(out, "report.md"), "w") as fh:
        fh.write(render_report(results, study))
