"""CheckpointStore: write-once, verified, committed checkpoints on any fsspec storage.

Protocol:
1. each save writes a new `step-{N:09d}/`; nothing is overwritten in place;
2. every rank writes its shards (`write_shard`), then the ranks meet at a barrier;
3. rank 0 writes `manifest.json`: step, layout, config hash, code version, each file's size and
   SHA-256, data cursor (RNG states live in each rank's shard);
4. `COMMITTED` is written last (temp + rename on local disk, one PUT on object storage); there is no
   mutable `latest` pointer: the newest committed step is found by listing;
5. resume takes the newest step whose marker exists and whose manifest verifies; others are reported,
   and newer committed steps that fail are set aside (`rejected/`) so the run can commit them anew;
6. the last `keep` committed steps are kept, older ones deleted only after the newer marker exists;
7. loading never unpickles code: shards are read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
from dataclasses import dataclass

import fsspec
import torch

log = logging.getLogger(__name__)

MARKER = "COMMITTED"
MANIFEST = "manifest.json"
REJECTED = "rejected"  # committed steps that failed verification, set aside by a resume (never deleted)
_STEP_RE = re.compile(r"step-(\d{9})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the step and file."""


@dataclass(frozen=True)
class CommittedStep:
    step: int
    path: str
    manifest: dict


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CheckpointStore:
    def __init__(self, uri: str, keep: int = 2, storage_options: dict | None = None):
        self.uri = uri.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **(storage_options or {}))
        self.keep = keep
        self._local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    # ---- layout -------------------------------------------------------------------------
    def step_path(self, step: int) -> str:
        return f"{self.root}/step-{step:09d}"

    def listed_steps(self) -> list[int]:
        self.fs.invalidate_cache()  # other processes write steps: never trust a cached listing
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        steps = []
        for entry in entries:
            m = _STEP_RE.search(entry.rstrip("/"))
            if m:
                steps.append(int(m.group(1)))
        return sorted(steps)

    def committed_steps(self) -> list[int]:
        return [s for s in self.listed_steps() if self.fs.exists(f"{self.step_path(s)}/{MARKER}")]

    # ---- writing ------------------------------------------------------------------------
    def write_shard(self, step: int, name: str, state: dict) -> dict:
        """Serialize `state` (tensors, numbers, strings, lists, dicts only) to `<step>/<name>`.
        Returns the file record {name, size, sha256} for the manifest."""
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        path = f"{self.step_path(step)}/{name}"
        if self.fs.exists(f"{self.step_path(step)}/{MARKER}"):
            raise CheckpointError(f"step {step} is already committed; checkpoints are write-once")
        self.fs.makedirs(self.step_path(step), exist_ok=True)
        self.fs.pipe_file(path, data)
        return {"name": name, "size": len(data), "sha256": _sha256(data)}

    def commit(self, step: int, files: list[dict], manifest: dict) -> CommittedStep:
        """Rank 0, after every rank's shards are written (barrier): write manifest, then the marker,
        then apply retention. `files` are the records from every rank's `write_shard`."""
        base = self.step_path(step)
        for rec in files:  # every shard must exist with the size its writer saw
            size = self.fs.size(f"{base}/{rec['name']}")
            if size != rec["size"]:
                raise CheckpointError(f"step {step}: shard {rec['name']} has {size} bytes, writer wrote {rec['size']}")
        full = {**manifest, "step": step, "files": {r["name"]: {"size": r["size"], "sha256": r["sha256"]}
                                                   for r in files}, "created": time.time()}
        self.fs.pipe_file(f"{base}/{MANIFEST}", json.dumps(full, indent=1, sort_keys=True).encode())
        self._write_marker(base, step)
        self.apply_retention()
        return CommittedStep(step, base, full)

    def _write_marker(self, base: str, step: int) -> None:
        body = json.dumps({"step": step, "time": time.time()}).encode()
        if self._local:
            tmp = f"{base}/.{MARKER}.tmp"
            self.fs.pipe_file(tmp, body)
            self.fs.mv(tmp, f"{base}/{MARKER}")
        else:  # one PUT is atomic on object storage
            self.fs.pipe_file(f"{base}/{MARKER}", body)

    def apply_retention(self) -> list[int]:
        """Delete all but the newest `keep` committed steps, and uncommitted steps older than the
        newest committed one (leftovers of interrupted saves). Returns the deleted steps."""
        committed = self.committed_steps()
        if not committed:
            return []
        keep = set(committed[-self.keep:])
        newest = committed[-1]
        doomed = [s for s in self.listed_steps() if s not in keep and (s in committed or s < newest)]
        for s in doomed:
            self.fs.rm(self.step_path(s), recursive=True)
        return doomed

    # ---- reading ------------------------------------------------------------------------
    def read_manifest(self, step: int) -> dict:
        try:
            return json.loads(self.fs.cat_file(f"{self.step_path(step)}/{MANIFEST}"))
        except FileNotFoundError:
            raise CheckpointError(f"step {step}: {MANIFEST} is missing") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"step {step}: {MANIFEST} is unreadable ({exc})") from None

    def verify(self, step: int, deep: bool = True) -> dict:
        """Check every file the manifest lists (size, and SHA-256 when deep). Returns the manifest."""
        manifest = self.read_manifest(step)
        base = self.step_path(step)
        for name, rec in sorted(manifest.get("files", {}).items()):
            path = f"{base}/{name}"
            if not self.fs.exists(path):
                raise CheckpointError(f"step {step}: shard {name} is missing")
            if self.fs.size(path) != rec["size"]:
                raise CheckpointError(f"step {step}: shard {name} has {self.fs.size(path)} bytes, "
                                      f"manifest says {rec['size']} (truncated or replaced)")
            if deep and _sha256(self.fs.cat_file(path)) != rec["sha256"]:
                raise CheckpointError(f"step {step}: shard {name} fails its SHA-256 check (corrupted)")
        return manifest

    def latest(self, deep: bool = True) -> tuple[CommittedStep | None, list[str]]:
        """Newest committed step that verifies, and the reasons older/newer candidates were skipped."""
        skipped: list[str] = []
        for step in reversed(self.committed_steps()):
            try:
                manifest = self.verify(step, deep=deep)
            except CheckpointError as exc:
                skipped.append(str(exc))
                log.warning("skipping checkpoint: %s", exc)
                continue
            return CommittedStep(step, self.step_path(step), manifest), skipped
        return None, skipped

    def set_aside(self, step: int) -> str:
        """Move step `step` out of the listing to `rejected/step-N-<time>/` (nothing is deleted), so that the
        run can commit that step number again. For a committed step that failed verification and that a
        resume from an older step will write anew (write-once would otherwise refuse it). Returns the path."""
        src = self.step_path(step)
        dest = f"{self.root}/{REJECTED}/step-{step:09d}-{time.strftime('%Y%m%dT%H%M%S')}"
        self.fs.makedirs(f"{self.root}/{REJECTED}", exist_ok=True)
        if self._local:
            self.fs.mv(src, dest, recursive=True)  # one rename
        else:  # object storage: copy every object, then drop the marker first so the step stops counting
            for path in self.fs.find(src):
                self.fs.copy(path, f"{dest}/{path[len(src):].lstrip('/')}")
            self.fs.rm(f"{src}/{MARKER}")
            self.fs.rm(src, recursive=True)
        self.fs.invalidate_cache()
        return dest

    def read_shard(self, step: int, name: str, manifest: dict | None = None) -> dict:
        """Load one shard (weights_only) after checking it against the manifest's SHA-256."""
        manifest = manifest or self.read_manifest(step)
        rec = manifest.get("files", {}).get(name)
        if rec is None:
            raise CheckpointError(f"step {step}: manifest lists no shard {name}")
        data = self.fs.cat_file(f"{self.step_path(step)}/{name}")
        if _sha256(data) != rec["sha256"]:
            raise CheckpointError(f"step {step}: shard {name} fails its SHA-256 check (corrupted)")
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def merge_shards(shards: list[dict]) -> dict:
    """Union of the sections ({"params": {...}, "exp_avg": {...}, ...}) of every writer's state shard.
    Keys never collide: each tensor of an engine state has exactly one writer."""
    merged: dict[str, dict] = {}
    for shard in shards:
        for section, values in shard.items():
            merged.setdefault(section, {}).update(values)
    return merged
