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

import functools
import hashlib
import io
import json
import logging
import re
import time
from dataclasses import dataclass

import torch

from .. import storage
from ..run_dir import REJECTED, STEP_PATTERN, step_folder

log = logging.getLogger(__name__)

MARKER = "COMMITTED"
MANIFEST = "manifest.json"
_STEP_RE = re.compile(rf"{STEP_PATTERN.pattern}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")  # a plain name inside the step folder
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_EXPERT_KEY = re.compile(r"^(.*)#(\d+)$")  # deepspeed writes experts one by one: `<stacked name>#<expert>`
# Manifest fields and their JSON types, checked when present (test stores commit minimal manifests).
_FIELDS = {"engine": str, "config_hash": str, "world_size": int, "layout": dict, "model": dict,
           "data_cursor": dict, "schedule": dict, "metrics": dict, "resume_fields": dict}
_LAYOUT_INTS = ("world_size", "ep", "dp", "zero_stage", "global_batch_size")


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
    def __init__(self, uri: str, keep: int = 2):
        self.uri = uri.rstrip("/")
        self.keep = keep
        self._local = storage.local_path(self.uri) is not None  # also refuses (StorageError) an unknown scheme

    # ---- layout -------------------------------------------------------------------------
    def step_path(self, step: int) -> str:
        """The URI of step `step`'s folder."""
        return f"{self.uri}/{step_folder(step)}"

    def listed_steps(self) -> list[int]:
        # never a cached listing (storage.list_names): other processes write steps
        steps = []
        for name in storage.list_names(self.uri):
            m = _STEP_RE.search(name)
            if m:
                steps.append(int(m.group(1)))
        return sorted(steps)

    def committed_steps(self) -> list[int]:
        return [s for s in self.listed_steps() if storage.exists(f"{self.step_path(s)}/{MARKER}")]

    # ---- writing ------------------------------------------------------------------------
    def write_shard(self, step: int, name: str, state: dict) -> dict:
        """Serialize `state` (tensors, numbers, strings, lists, dicts only) to `<step>/<name>`.
        Returns the file record {name, size, sha256} for the manifest, with the names of the tensors
        of its `params` section (`tensors`) when it has one: verification then knows, from the
        manifest alone, whether every tensor the model needs is there."""
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        path = f"{self.step_path(step)}/{name}"
        if storage.exists(f"{self.step_path(step)}/{MARKER}"):
            raise CheckpointError(f"step {step} is already committed; checkpoints are write-once")
        storage.makedirs(self.step_path(step))
        storage.write_bytes(path, data)  # in place: the marker, written last, commits the step
        record = {"name": name, "size": len(data), "sha256": _sha256(data)}
        if isinstance(state.get("params"), dict):
            record["tensors"] = sorted(state["params"])
        return record

    def commit(self, step: int, files: list[dict], manifest: dict) -> CommittedStep:
        """Rank 0, after every rank's shards are written (barrier): write manifest, then the marker,
        then apply retention. `files` are the records from every rank's `write_shard`."""
        base = self.step_path(step)
        for rec in files:  # every shard must exist with the size its writer saw
            size = storage.size(f"{base}/{rec['name']}")
            if size != rec["size"]:
                raise CheckpointError(f"step {step}: shard {rec['name']} has {size} bytes, writer wrote {rec['size']}")
        full = {**manifest, "step": step, "files": {r["name"]: {k: v for k, v in r.items() if k != "name"}
                                                   for r in files}, "created": time.time()}
        storage.write_bytes(f"{base}/{MANIFEST}", json.dumps(full, indent=1, sort_keys=True).encode())
        # the marker appears whole or not at all (storage's commit rule), so a listed marker means committed
        storage.write_bytes_atomic(f"{base}/{MARKER}",
                                   json.dumps({"step": step, "time": time.time()}).encode())
        self.apply_retention()
        return CommittedStep(step, base, full)

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
            storage.remove(self.step_path(s), recursive=True, missing_ok=False)
        return doomed

    # ---- reading ------------------------------------------------------------------------
    def read_manifest(self, step: int) -> dict:
        """The manifest of `step`, checked for shape (the one place manifests are parsed): every reader
        (resume, plan --resume-from, export) gets a CheckpointError naming the step, never a KeyError."""
        base = self.step_path(step)
        if storage.islink(base):
            raise CheckpointError(f"step {step}: {base} is a symbolic link; a run's checkpoints are folders it "
                                  "wrote itself: remove the link (copy the folder in if it is wanted)")
        try:
            manifest = json.loads(storage.read_bytes(f"{base}/{MANIFEST}"))
        except FileNotFoundError:
            raise CheckpointError(f"step {step}: {MANIFEST} is missing") from None
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise CheckpointError(f"step {step}: {MANIFEST} is unreadable ({exc})") from None
        check_manifest(step, manifest)
        return manifest

    def verify(self, step: int, deep: bool = True) -> dict:
        """Check every file the manifest lists (size, and SHA-256 when deep) and that the tensors they
        hold cover the model the manifest describes. Returns the manifest."""
        manifest = self.read_manifest(step)
        base = self.step_path(step)
        for name, rec in sorted(manifest["files"].items()):
            path = f"{base}/{name}"
            if storage.islink(path):
                raise CheckpointError(f"step {step}: shard {name} is a symbolic link; restore the file itself")
            if not storage.exists(path):
                raise CheckpointError(f"step {step}: shard {name} is missing")
            if storage.size(path) != rec["size"]:
                raise CheckpointError(f"step {step}: shard {name} has {storage.size(path)} bytes, "
                                      f"manifest says {rec['size']} (truncated or replaced)")
            if deep and _sha256(storage.read_bytes(path)) != rec["sha256"]:
                raise CheckpointError(f"step {step}: shard {name} fails its SHA-256 check (corrupted)")
        _check_tensor_names(step, manifest)
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
        dest = f"{self.uri}/{REJECTED}/{step_folder(step)}-{time.strftime('%Y%m%dT%H%M%S')}"
        storage.makedirs(f"{self.uri}/{REJECTED}")
        if self._local:
            storage.move(src, dest)  # one rename
        else:  # object storage: copy every object, then drop the marker first so the step stops counting
            storage.copy_tree(src, dest)
            storage.remove(f"{src}/{MARKER}", missing_ok=False)
            storage.remove(src, recursive=True, missing_ok=False)
        return dest

    def read_shard(self, step: int, name: str, manifest: dict | None = None) -> dict:
        """Load one shard (weights_only) after checking it against the manifest's SHA-256."""
        manifest = manifest or self.read_manifest(step)
        rec = manifest.get("files", {}).get(name)
        if rec is None:
            raise CheckpointError(f"step {step}: manifest lists no shard {name}")
        data = storage.read_bytes(f"{self.step_path(step)}/{name}")
        if _sha256(data) != rec["sha256"]:
            raise CheckpointError(f"step {step}: shard {name} fails its SHA-256 check (corrupted)")
        try:
            state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError/UnpicklingError/EOFError/...
            text = str(exc)
            unsafe = [ln.strip() for ln in text.splitlines() if "Unsupported global" in ln]
            why = (f"it holds objects that weights_only loading refuses, never unpickled ({unsafe[0][:200]})"
                   if unsafe else f"{type(exc).__name__}: {text[:200]}")
            raise CheckpointError(f"step {step}: shard {name} is not a tensor file written by torch.save: "
                                  f"{why}") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"step {step}: shard {name} holds a {type(state).__name__}, not a state mapping")
        return state


def check_manifest(step: int, manifest) -> None:
    """Refuse a manifest of the wrong shape, or one that is not this step's, naming what is wrong."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"step {step}: {MANIFEST} is malformed: {why}; this step cannot be used")

    if not isinstance(manifest, dict):
        raise bad(f"a JSON {type(manifest).__name__} where an object is expected")
    got = manifest.get("step")
    if not _is_int(got):
        raise bad(f"'step' is {got!r}, not an integer")
    if got != step:
        raise CheckpointError(f"step {step}: {MANIFEST} is the manifest of step {got}, not of this folder's step "
                              f"(a copied or renamed folder); this step cannot be used")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise bad(f"'files' is {type(files).__name__}, not an object of file records")
    for name, rec in files.items():
        if not _FILE_NAME.match(name):
            raise bad(f"file name {name[:80]!r} is not a plain file name")
        if not isinstance(rec, dict) or not _is_int(rec.get("size")) or rec["size"] < 0:
            raise bad(f"file {name} has no size")
        if not isinstance(rec.get("sha256"), str) or not _SHA256.match(rec["sha256"]):
            raise bad(f"file {name} has no SHA-256")
        tensors = rec.get("tensors")
        if tensors is not None and not (isinstance(tensors, list) and all(isinstance(t, str) for t in tensors)):
            raise bad(f"file {name}: 'tensors' is not a list of names")
    for key, tp in _FIELDS.items():
        if key in manifest and not isinstance(manifest[key], tp):
            raise bad(f"{key!r} is {type(manifest[key]).__name__}, expected {tp.__name__}")
    for key in _LAYOUT_INTS:
        if "layout" in manifest and not _is_int(manifest["layout"].get(key)):
            raise bad(f"'layout.{key}' is missing or not an integer")
    if "data_cursor" in manifest and not _is_int(manifest["data_cursor"].get("samples_consumed")):
        raise bad("'data_cursor.samples_consumed' is missing or not an integer")
    if "schedule" in manifest and not all(isinstance(manifest["schedule"].get(k), (int, float)) for k in
                                          ("lr", "min_lr", "warmup_steps", "total_steps")):
        raise bad("'schedule' lacks lr, min_lr, warmup_steps or total_steps")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_tensor_names(step: int, manifest: dict) -> None:
    """The tensors the manifest's files hold cover every tensor of the model it describes: a shard that
    is gone together with its manifest entry is caught from the manifest alone (plan and resume alike)."""
    records = [rec["tensors"] for rec in manifest["files"].values() if "tensors" in rec]
    if not records or "model" not in manifest:
        return  # a checkpoint written before tensor names were recorded: its files are all that is known
    try:
        missing = missing_tensors(frozenset(n for names in records for n in names),
                                  json.dumps(manifest["model"], sort_keys=True))
    except CheckpointError as exc:
        raise CheckpointError(f"step {step}: {exc}") from None
    if missing:
        raise CheckpointError(f"step {step}: the checkpoint lacks {len(missing)} tensors of the model its manifest "
                              f"describes, e.g. {', '.join(missing[:3])} (a shard and its manifest entry are gone)")


@functools.lru_cache(maxsize=8)
def missing_tensors(names: frozenset[str], model_json: str) -> list[str]:
    """Reference-model tensors (of the model config `model_json`) that `names` lacks. Names are reference
    names; experts come stacked or one by one (`name#e`); a router's expert bias and a tied output
    weight may be absent (they are rebuilt on load, as launcher/export.py's to_reference does)."""
    from .. import models

    model_cfg = json.loads(model_json)
    try:
        with torch.device("meta"):
            reference = models.Transformer(models.ModelConfig(**model_cfg)).state_dict()
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{MANIFEST} is malformed: its 'model' does not describe a model ({exc})") from None
    experts: dict[str, set[int]] = {}
    for name in names:
        m = _EXPERT_KEY.match(name)
        if m:
            experts.setdefault(m.group(1), set()).add(int(m.group(2)))
    missing = []
    for name, ref in reference.items():
        if name in names or name.endswith("router.expert_bias") or (
                model_cfg.get("tie_embeddings") and name == "output.weight"):
            continue
        lacking = sorted(set(range(ref.shape[0])) - experts[name]) if name in experts else None
        if lacking is None:
            missing.append(name)
        elif lacking:
            missing.append(f"{name} (experts {lacking[:8]})")
    return missing


def merge_shards(shards: list[dict]) -> dict:
    """Union of the sections ({"params": {...}, "exp_avg": {...}, ...}) of every writer's state shard.
    Keys never collide: each tensor of an engine state has exactly one writer."""
    merged: dict[str, dict] = {}
    for shard in shards:
        for section, values in shard.items():
            merged.setdefault(section, {}).update(values)
    return merged
