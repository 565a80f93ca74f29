"""`raytron export RUN --format hf --out DIR`: a checkpoint as a Hugging Face transformers model directory.

DIR gets `model-0000i-of-0000N.safetensors` shards with `model.safetensors.index.json`, `config.json`
(LlamaForCausalLM, MistralForCausalLM or MixtralForCausalLM, models/hf_format.py), `generation_config.json`
and the run's tokenizer files, so `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads it. A
model that no transformers class computes exactly is refused, naming what differs, before the checkpoint
is read.
Everything is written into a temporary directory beside DIR and renamed into place at the end: DIR
never holds a partial export (with --force an existing DIR is replaced only once the new one is complete).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid

import torch

from .. import storage
from ..storage import local_scratch_root

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """`5GB` (10^9, as transformers), `500MiB` (2^20), or a plain byte count -> bytes (ValueError if bad)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS or float(m.group(1)) * _UNITS[unit] < 1:
        raise ValueError(f"--max-shard-size {text!r}: give a size such as 5GB, 500MB, 2GiB or a byte count")
    return int(float(m.group(1)) * _UNITS[unit])


def run_spec(run_uri: str):
    """The run's resolved job config (`<run>/config.yaml`); ValueError naming the file when absent."""
    from ..config.spec import ConfigError, load_spec
    from ..run_dir import RunDir

    config = RunDir.given(run_uri).config
    try:
        return load_spec(config)
    except ConfigError as exc:
        raise ValueError(f"{config} (the run's config, needed for the model and tokenizer): {exc}") from None


def check_exportable(spec) -> None:
    """ValueError naming what differs when no transformers class computes the run's model."""
    from ..models.hf_format import HFFormatError, hf_model_type
    from .validate import resolved_model_config

    try:
        hf_model_type(resolved_model_config(spec))
    except HFFormatError as exc:
        raise ValueError(f"{spec.model.family}/{spec.model.flavor} cannot be exported as a Hugging Face "
                         f"model: {exc}") from None


def shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive groups of at most max_bytes each (a larger tensor gets a shard of its own)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def write_weights(out_dir: str, tensors: dict[str, torch.Tensor], max_bytes: int) -> int:
    """Sharded safetensors plus model.safetensors.index.json into the local directory out_dir."""
    import safetensors.torch

    shards = shard(tensors, max_bytes)
    weight_map, total = {}, 0
    for i, part in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        safetensors.torch.save_file(part, os.path.join(out_dir, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(os.path.join(out_dir, "model.safetensors.index.json"), index)
    return len(shards)


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _write_tokenizer(run_config, out_dir: str) -> bool:
    """The run's tokenizer files into out_dir (its `save_pretrained`); one that transformers cannot load
    exactly (the tokenizer refuses, e.g. SentencePiece) writes nothing and says why. True when written."""
    from ..data_pipeline import DataError
    from ..data_pipeline.tokenizer import get_tokenizer

    try:
        get_tokenizer(run_config.data.tokenizer).save_pretrained(out_dir)
    except DataError as exc:
        print(f"[raytron] tokenizer files were not written ({exc}); config.json and the weights are complete: "
              f"load the tokenizer from {run_config.data.tokenizer} itself")
        return False
    return True


def token_ids(spec) -> dict[str, int | None]:
    """bos/eos/pad ids of the run's tokenizer (eos: its end-of-document id when it has no eos)."""
    from ..data_pipeline.tokenizer import get_tokenizer

    tok = get_tokenizer(spec.data.tokenizer)
    eos = getattr(tok, "eos_id", None)
    return {"bos_token_id": getattr(tok, "bos_id", None),
            "eos_token_id": eos if eos is not None else getattr(tok, "eod_id", None),
            "pad_token_id": getattr(tok, "pad_id", None)}


def build_directory(tmp: str, spec, model_cfg, ref: dict[str, torch.Tensor], dtype: str, max_bytes: int) -> int:
    """Everything DIR holds, written into the local directory tmp; returns the number of shards."""
    from ..models.hf_format import to_hf_config, to_hf_state

    ids = token_ids(spec)
    config = to_hf_config(model_cfg, dtype=dtype, max_position_embeddings=spec.train.seq_len, **ids)
    tensors = {k: v.to(DTYPES[dtype]).contiguous() for k, v in to_hf_state(model_cfg, ref).items()}
    count = write_weights(tmp, tensors, max_bytes)
    _write_json(os.path.join(tmp, "config.json"), config)
    _write_json(os.path.join(tmp, "generation_config.json"),
                {"_from_model_config": True, **{k: v for k, v in ids.items() if v is not None}})
    _write_tokenizer(spec, tmp)
    return count


def place(tmp: str, out: str, force: bool) -> None:
    """Move the finished local directory tmp to DIR (`out`): one rename locally (the replaced DIR is removed
    after), an upload to a temporary name then a move on object storage."""
    path = storage.local_path(out)
    if path is not None:
        old = None
        if os.path.exists(path):
            if not force:
                raise ValueError(f"--out {path} appeared while exporting: pass --force to replace it")
            old = f"{path}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old:
            shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)
        return
    staging = f"{out.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        storage.upload_dir(tmp, staging)
        if storage.exists(out):
            if not force:
                raise ValueError(f"--out {out} appeared while exporting: pass --force to replace it")
            storage.remove(out, recursive=True, missing_ok=False)
        storage.move(staging, out)
    finally:
        storage.remove(staging, recursive=True)


def local_tmp_dir(out: str) -> str:
    """A fresh temporary directory beside DIR (`out`, local), else in the local scratch root."""
    path = storage.local_path(out)
    parent = os.path.dirname(path.rstrip("/")) if path is not None else str(local_scratch_root())
    return tempfile.mkdtemp(prefix=f".{os.path.basename(out.rstrip('/'))}.tmp-", dir=parent or ".")
