"""`model.init_from`: start a run from a Hugging Face Llama/Mistral/Mixtral checkpoint directory.

The driver (`check_init_from`, from validate_job: plan and submit) reads only config.json and the
safetensors headers, and refuses a checkpoint whose model is not the job's model, naming the
`model.overrides` field and the value that would match, or the tensor that is missing, unexpected or of
the wrong shape. Workers (`reference_state`) read the tensors and convert them to the reference model's
state dict, which each engine loads with its own `load_reference` when no checkpoint of the run exists.
"""

from __future__ import annotations

import json
import struct

from .. import storage
from ..config.strict_yaml import ConfigError

FIELD = "model.init_from"
# ModelConfig fields a transformers Llama/Mistral/Mixtral checkpoint fixes (config.json key in brackets)
_SHAPE_FIELDS = {"vocab_size": "vocab_size", "dim": "hidden_size", "num_heads": "num_attention_heads",
                 "num_kv_heads": "num_key_value_heads", "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps",
                 "tie_embeddings": "tie_word_embeddings", "num_experts": "num_local_experts",
                 "top_k": "num_experts_per_tok"}
_KEYS = {**_SHAPE_FIELDS, "num_layers": "num_hidden_layers", "head_dim": "head_dim", "ffn_dim": "intermediate_size",
         "moe_ffn_dim": "intermediate_size", "pattern": "sliding_window", "window": "sliding_window"}
_HEADER_MAX = 100 * 2**20  # safetensors' own limit on a header


def _read_json(uri: str, what: str) -> dict:
    try:
        return json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        raise ConfigError(FIELD, f"{uri} not found: {what}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(FIELD, f"cannot read {uri}: {exc}") from None


def weight_files(root: str) -> list[str]:
    """The URIs of the safetensors files of a checkpoint directory: those its index names, else every
    *.safetensors."""
    index = storage.join(root, "model.safetensors.index.json")
    if storage.exists(index):
        return [storage.join(root, n) for n in sorted(set(_read_json(index, "")["weight_map"].values()))]
    files = [storage.join(root, n) for n in storage.list_names(root) if n.endswith(".safetensors")]
    if not files:
        raise ConfigError(FIELD, f"{root} holds no *.safetensors file (.bin checkpoints are not read: they unpickle "
                                 f"code); convert it with transformers' save_pretrained(safe_serialization=True)")
    return files


def header_shapes(root: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape over every safetensors file of `root`, from their headers only."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in weight_files(root):
        try:
            with storage.open_file(path) as f:
                (size,) = struct.unpack("<Q", f.read(8))
                if size > _HEADER_MAX:
                    raise ValueError(f"header of {size} bytes")
                header = json.loads(f.read(size))
        except (OSError, ValueError, struct.error) as exc:
            raise ConfigError(FIELD, f"{path} is not a readable safetensors file: {exc}") from None
        shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return shapes


def checkpoint_config(root: str):
    """The reference ModelConfig of the checkpoint at `root` (ConfigError naming what is unsupported)."""
    from ..models.hf_format import HFFormatError, from_hf_config

    uri = f"{root.rstrip('/')}/config.json"
    config = _read_json(uri, "model.init_from must be a Hugging Face model directory with config.json")
    try:
        return config, from_hf_config(config, uri)
    except HFFormatError as exc:
        raise ConfigError(FIELD, str(exc)) from None


def check_init_from(spec, job_cfg) -> None:
    """Refuse (ConfigError) a model.init_from whose model differs from `job_cfg` (the job's resolved
    ModelConfig, vocabulary included) or whose tensors do not match its config.json. Not checked once
    the run has a committed checkpoint (the directory may be gone by then)."""
    from ..models.hf_format import HFFormatError, check_hf_tensors, hf_model_type
    from ..parallelism.checkpoint import CheckpointStore

    if CheckpointStore(spec.run_dir.checkpoints).committed_steps():
        return  # the run continues from its own checkpoint and never reads init_from again
    root = spec.model.init_from
    config, ckpt = checkpoint_config(root)
    try:
        hf_model_type(job_cfg)
    except HFFormatError as exc:
        raise ConfigError(FIELD, f"the job's model has no transformers counterpart to load weights from: "
                                 f"{exc}") from None
    if bool(job_cfg.num_experts) != bool(ckpt.num_experts):
        raise ConfigError("model.family", f"{root} holds a {config.get('architectures')} checkpoint "
                                          f"({'MoE' if ckpt.num_experts else 'dense'}) but the job's model is "
                                          f"{'MoE' if job_cfg.num_experts else 'dense'}: choose a "
                                          f"{'MoE' if ckpt.num_experts else 'dense'} family")
    diffs = _differences(job_cfg, ckpt)
    if diffs:
        field, ours, theirs = diffs[0]
        key = _KEYS[field]
        raise ConfigError(f"model.overrides.{field}",
                          f"the job's model has {field}={ours!r}, the checkpoint has {field}={theirs!r} "
                          f"({root}/config.json: {key}): "
                          f"set model.overrides.{field}={theirs!r} (or a flavor of that shape); "
                          f"{len(diffs)} field(s) differ: {', '.join(d[0] for d in diffs)}")
    try:
        check_hf_tensors(ckpt, header_shapes(root), root)
    except HFFormatError as exc:
        raise ConfigError(FIELD, str(exc)) from None


def _differences(job, ckpt) -> list[tuple[str, object, object]]:
    out = [(f, getattr(job, f), getattr(ckpt, f)) for f in _SHAPE_FIELDS if getattr(job, f) != getattr(ckpt, f)]
    if len(job.layer_pattern()) != len(ckpt.layer_pattern()):
        out.append(("num_layers", len(job.layer_pattern()) // 2, len(ckpt.layer_pattern()) // 2))
    elif job.layer_pattern() != ckpt.layer_pattern():  # windowed (`W`) or not
        out.append(("pattern", job.layer_pattern(), ckpt.layer_pattern()))
    if "W" in ckpt.layer_pattern() and job.window != ckpt.window:
        out.append(("window", job.window, ckpt.window))
    if job.attn_head_dim != ckpt.attn_head_dim:
        out.append(("head_dim", job.attn_head_dim, ckpt.attn_head_dim))
    ffn = "moe_ffn_dim" if ckpt.num_experts else "ffn_dim"
    if getattr(job, ffn) != getattr(ckpt, ffn):
        out.append((ffn, getattr(job, ffn), getattr(ckpt, ffn)))
    return out


def reference_state(root: str, job_cfg) -> dict:
    """The checkpoint's tensors as the reference state dict of `job_cfg` (fp32), read in full."""
    import safetensors.torch

    from ..models.hf_format import from_hf_state

    tensors = {}
    for path in weight_files(root):
        tensors.update(safetensors.torch.load(storage.read_bytes(path)))
    return from_hf_state(job_cfg, tensors)
