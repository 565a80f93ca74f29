"""`raytron study` end to end on CPU (embedded Ray): every family trains a few steps, the report and plots
are written, results.json holds every metric, and an interrupted study resumed equals an uninterrupted one.

One study serves every test (each family's run costs a Ray worker group start, ~20 s on CI): it is first
run with gated_deltanet failing at step 4, so the other families train on and its report lists the failure;
running the same command again resumes gated_deltanet from its step-2 checkpoint and retrains nothing else.
The uninterrupted reference is gated_deltanet alone in another study directory.
"""

from __future__ import annotations

import contextlib
import io
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
def runs(tmp_path_factory, ray_local):
    """{first: (rc, results, report) of the interrupted study, resumed: (rc, console log), out}."""
    out = tmp_path_factory.mktemp("study") / "full"
    rc = main(["study", str(CONFIG), "--out", str(out), "--interrupt-at", "gated_deltanet:4"])
    first = (rc, json.loads((out / "results.json").read_text()), (out / "report.md").read_text())
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        rc = main(["study", str(CONFIG), "--out", str(out)])
    return {"first": first, "resumed": (rc, log.getvalue()), "out": out}


@pytest.fixture(scope="module")
def study(runs):
    out = runs["out"]
    assert runs["resumed"][0] == 0, runs["resumed"][1][-3000:]
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


def test_failed_family_reported_while_the_others_train(runs):
    rc, results, report = runs["first"]
    assert rc == 1, "a study with a failed family exits 1"
    assert list(results["families"]) == [n for n in FAMILIES if n != "gated_deltanet"]
    assert list(results["failed"]) == ["gated_deltanet"]
    assert "injected exception on rank 0 at step 4" in results["failed"]["gated_deltanet"]["error"]
    assert "## Failed families" in report and "| gated_deltanet |" in report
    linear = next(detail for title, (_, detail) in results["claims"].items() if title.startswith("linear"))
    assert "mamba2: perplexity" in linear and "gated_deltanet" not in linear, "judged on the families that trained"


def test_interrupted_study_resumes_to_the_same_results(study, runs, tmp_path):
    out, resumed = study
    log = runs["resumed"][1]
    for name in FAMILIES:
        if name != "gated_deltanet":
            assert f"{name}: pattern" in log and "completed earlier, not retrained" in log.split(f"{name}: pattern")[1].split("\n")[0]
    assert "gated_deltanet" in log and "resuming from step 2" in log
    assert resumed["failed"] == {} and resumed["resumed_by"] is None
    alone = tmp_path / "uninterrupted"
    assert main(["study", subset(tmp_path, ["gated_deltanet"]), "--out", str(alone)]) == 0
    reference = json.loads((alone / "results.json").read_text())["families"]["gated_deltanet"]
    assert resumed["families"]["gated_deltanet"]["val_loss"] == reference["val_loss"]  # exact
    assert resumed["families"]["gated_deltanet"]["loss_curve"] == reference["loss_curve"]
    assert main(["study", subset(tmp_path, ["full_attention"]), "--out", str(out)]) == 2, \
        "another study in the same directory is refused"
