"""`raytron study` end to end on CPU (embedded Ray): every family trains a few steps, the report and plots
are written, results.json holds every metric, and an interrupted study resumed equals an uninterrupted one."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from raytron.launcher.cli import main
from raytron.launcher.study_config import FAMILIES

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "cluster_configs" / "study_cpu.yaml"
METRICS = ("val_loss", "perplexity", "bits_per_byte", "tokens_per_s", "peak_mem_bytes", "wall_s", "train_tokens",
           "active_params")


def subset(tmp_path: Path, families: list[str]) -> str:
    """The CPU study restricted to `families` (each family's run is the same as in the full study)."""
    text = CONFIG.read_text().replace("base: study_base_cpu.yaml", f"base: {CONFIG.parent / 'study_base_cpu.yaml'}")
    lines = [ln for ln in text.splitlines() if not ln.startswith(("families:", "           gdn_hybrid"))]
    path = tmp_path / "subset.yaml"
    path.write_text("\n".join(lines + [f"families: [{', '.join(families)}]"]) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def study(tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("study") / "full"
    assert main(["study", str(CONFIG), "--out", str(out)]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_every_family_and_metric_present_and_finite(study):
    out, results = study
    assert list(results["families"]) == list(FAMILIES)
    for name, fam in results["families"].items():
        for key in METRICS:
            assert isinstance(fam[key], (int, float)) and math.isfinite(fam[key]), f"{name}.{key} = {fam[key]!r}"
        # CPU: no peak FLOP/s to divide by, so MFU is null (documented in report.md)
        assert fam["mfu"] is None
        assert abs(fam["active_gap"]) <= results["study"]["tolerance"]
        assert [r["seq"] for r in fam["sweep"]] == results["study"]["contexts"]
        for row in fam["sweep"]:
            assert row["tokens_per_s"] > 0 and row["peak_mem_bytes"] > 0
        assert fam["perplexity"] == pytest.approx(math.exp(fam["val_loss"]))
    assert results["machine"]["device"] == "cpu" and results["command"].startswith("raytron study")
    assert "non_finite" not in results


def test_bits_per_byte_from_tokenizer(study):
    """bpb = total validation nats / ln 2 / bytes, bytes decoded from the evaluated validation tokens."""
    from raytron.data_pipeline import prepare_for_job
    from raytron.config.spec import load_spec

    out, results = study
    spec = load_spec(str(out / "full_attention" / "config.yaml"))
    data = prepare_for_job(spec.data, seq_len=spec.train.seq_len, seed=spec.train.seed,
                           cache_uri=str(out / "_data_cache"))
    gbs, n = spec.train.global_batch_size, spec.train.eval_batches
    targets = data.valid.global_batch(0, gbs * n)[:, 1:].numpy()
    nbytes = int((targets < 256).sum())  # the byte tokenizer: one UTF-8 byte per id below 256
    assert results["validation"] == {"tokens": targets.size, "bytes": nbytes}
    fam = results["families"]["full_attention"]
    assert fam["bits_per_byte"] == pytest.approx(fam["val_loss"] * targets.size / math.log(2) / nbytes, rel=1e-12)


def test_report_and_plots(study):
    out, results = study
    report = (out / "report.md").read_text()
    for name in FAMILIES:
        assert f"| {name} |" in report
    for title, (status, detail) in results["claims"].items():
        assert status in ("confirmed", "not confirmed", "not measurable here")
        assert f"**{title}**: {status}" in report
    # a few CPU steps are far below claims.min_train_tokens: perplexity claims cannot be judged
    for title, (status, detail) in results["claims"].items():
        if "perplexity" in title:
            assert "below claims.min_train_tokens=100,000,000" in detail
    for png in ("loss_vs_tokens.png", "bpb_vs_tokens_per_s.png", "tokens_per_s_vs_context.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_interrupted_study_resumes_to_the_same_results(study, tmp_path, capsys):
    out_full, full = study
    config = subset(tmp_path, ["full_attention", "gated_deltanet"])
    out = tmp_path / "interrupted"
    # the first family completes, the second fails at step 4 (its step-2 checkpoint is committed)
    assert main(["study", config, "--out", str(out), "--interrupt-at", "gated_deltanet:4"]) == 1
    assert not (out / "results.json").exists()
    assert main(["study", config, "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "full_attention: pattern" in log and "completed earlier, not retrained" in log
    assert "gated_deltanet" in log and "resuming from step 2" in log
    resumed = json.loads((out / "results.json").read_text())
    for name in ("full_attention", "gated_deltanet"):
        assert resumed["families"][name]["val_loss"] == full["families"][name]["val_loss"]  # exact
        assert resumed["families"][name]["loss_curve"] == full["families"][name]["loss_curve"]
    other = subset(tmp_path, ["full_attention"])
    assert main(["study", other, "--out", str(out)]) == 2, "another study in the same directory is refused"
