"""`raytron data prepare` as the launcher will mount it: summary numbers, exit codes, parallelism."""

from __future__ import annotations

import argparse
import json

from raytron.data_pipeline import IndexedTokens
from raytron.data_pipeline.cli import add_subparser, main, run

from tests.data.datapipe_helpers import write_jsonl


def test_mounts_under_a_foreign_parser(tmp_path, capsys, text_corpus):
    root, docs = text_corpus
    parser = argparse.ArgumentParser(prog="raytron")
    subs = parser.add_subparsers(dest="command", required=True)
    subs.add_parser("submit")  # the launcher's own commands live beside ours
    add_subparser(subs)
    args = parser.parse_args(["data", "prepare", root, "--out", str(tmp_path / "o"), "--json", "--no-progress"])
    assert args.func is run and run(args) == 0
    summary = json.loads(capsys.readouterr().out)
    total = sum(len(t.encode()) + 1 for t in docs.values())
    assert (summary["documents"], summary["tokens"], summary["files"]) == (len(docs), total, len(docs))
    assert summary["tokens_per_s"] > 0 and summary["skipped"]["malformed_lines"] == 0


def test_bad_inputs_reported_and_strict_exit(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "ok"}, "{oops", {"text": "fine"}])
    (tmp_path / "empty.txt").write_bytes(b"")
    argv = ["data", "prepare", str(tmp_path), "--out", str(tmp_path / "out" / "ds")]
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert "documents 2" in cap.out and "malformed_lines 1" in cap.out and "empty_files 1" in cap.out
    assert "a.jsonl:2" in cap.out
    assert "prepare" in cap.err  # the progress bar
    assert main(argv + ["--strict", "--no-progress", "--force"]) == 1


def test_missing_path_exit_2_names_it(tmp_path, capsys):
    assert main(["data", "prepare", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data source not found:") and str(tmp_path / "nope") in err
    assert not (tmp_path / "o.idx").exists()


def test_parallel_workers_write_identical_dataset(tmp_path, text_corpus, capsys):
    root, _ = text_corpus
    runs = {"w1": ["--workers", "1"], "t3": ["--workers", "3"], "p2": ["--workers", "2", "--pool", "process"]}
    for name, extra in runs.items():
        assert main(["data", "prepare", root, "--out", str(tmp_path / name), "--no-progress", *extra]) == 0
    out = capsys.readouterr().out
    assert "3 thread worker(s)" in out and "2 process worker(s)" in out
    for name in ("t3", "p2"):
        for ext in ("bin", "idx"):
            assert (tmp_path / f"w1.{ext}").read_bytes() == (tmp_path / f"{name}.{ext}").read_bytes()
    assert len(IndexedTokens(str(tmp_path / "p2"))) == 12
