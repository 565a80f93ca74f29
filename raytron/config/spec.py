"""JobSpec: the whole pretraining job as typed, strict, frozen config.

Load with `load_spec(path, overrides)`. Unknown keys, duplicate keys, wrong types and out-of-range
values are ConfigErrors naming the dotted field. Secrets never live here: credentials for storage
come from the environment (e.g. AWS_ACCESS_KEY_ID) and are never written into the resolved record.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .strict_yaml import MAX_DEPTH, MAX_DOCUMENT_BYTES, ConfigError, load_yaml, parse_scalar
from .. import storage
from ..run_dir import RunDir, data_cache_under
from ..typed import build, check, to_dict


@dataclass(frozen=True)
class ModelSpec:
    family: str = "moe"
    """Architecture family in the models registry (`raytron.models.list_flavors()`)."""
    flavor: str = "debug"
    """Named size/shape of that family; every family has `debug`."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Field overrides applied to the flavor's config (e.g. {num_layers: 4})."""
    init_from: str | None = None
    """Start from the weights of a Hugging Face transformers checkpoint instead of a random init: a
    directory (local path or fsspec URI) with config.json and *.safetensors, of LlamaForCausalLM,
    MistralForCausalLM (dense families; Mistral's window makes every attention layer `W`) or
    MixtralForCausalLM (MoE), as `raytron export --format hf` writes them. The model keeps
    its shape from family/flavor/overrides, and the checkpoint must have that shape: plan and submit
    refuse any difference (config.json field or safetensors tensor), naming the model.overrides field
    and the value that would match. The vocabulary must match exactly (the embedding is not padded).
    Read only while the run has no committed checkpoint of its own; after that, every start (a restart
    or `--resume`) continues from the run's checkpoint and neither checks nor reads init_from."""

    def validate(self, path: str) -> None:
        if self.init_from is not None:
            check_uri(self.init_from, f"{path}.init_from")


@dataclass(frozen=True)
class LayoutSpec:
    tp: int = 1
    """Tensor-parallel degree."""
    pp: int = 1
    """Pipeline-parallel stages."""
    vpp: int = 1
    """Virtual pipeline chunks per stage (interleaved 1F1B when > 1)."""
    ep: int = 1
    """Expert-parallel degree (borrows ranks from dp*cp*tp, Megatron's folding)."""
    etp: int = 1
    """Expert tensor-parallel degree."""
    cp: int = 1
    """Context-parallel degree (attention layers)."""
    dp: int | None = None
    """Data-parallel degree; null derives it as workers / (tp*pp*cp)."""
    zero_stage: int = 1
    """Optimizer/gradient/parameter sharding over data parallel ranks. deepspeed: the ZeRO stage (0-3;
    3 is refused with MoE). megatron: 1 = its distributed optimizer (optimizer state sharded over DP,
    ZeRO-1 equivalent), 0 = replicated optimizer; 2 and 3 are refused."""

    offload: Literal["none", "optimizer", "optimizer+params"] = "none"
    """deepspeed: ZeRO-Offload to host memory. optimizer: fp32 master weights and Adam state
    (ZeRO 1-3); optimizer+params: the parameters too (ZeRO-3 only). On CPU jobs it runs the same DeepSpeed
    code path and saves nothing (everything is in host memory already). Not offered by megatron."""

    def validate(self, path: str) -> None:
        for name in ("tp", "pp", "vpp", "ep", "etp", "cp"):
            check(getattr(self, name) >= 1, f"{path}.{name}", f"got {getattr(self, name)}; must be >= 1")
        check(self.dp is None or self.dp >= 1, f"{path}.dp", f"got {self.dp}; must be >= 1 or null")
        check(self.zero_stage in (0, 1, 2, 3), f"{path}.zero_stage",
              f"got {self.zero_stage}; allowed 0, 1, 2, 3 (ZeRO stage; megatron takes 1)")


@dataclass(frozen=True)
class ResourcesSpec:
    workers: int = 2
    """Number of training processes (one per GPU, or per CPU slot without GPUs)."""
    use_gpu: bool = False
    """Place each worker on a GPU (NCCL) instead of a CPU slot (gloo)."""
    nodes: int = 1
    """Nodes the job spans; workers are spread evenly over them."""
    cpus_per_worker: int = 1
    """CPU slots Ray reserves per worker."""
    torch_threads: int = 1
    """torch intra-op threads per CPU worker (keeps local CPU runs from oversubscribing cores)."""
    allow_oversubscribe: bool = False
    """CPU workers: run even when the plan's memory estimate for the workers of one node exceeds this
    machine's RAM (refused otherwise, with the numbers)."""

    def validate(self, path: str) -> None:
        check(self.workers >= 1, f"{path}.workers", f"got {self.workers}; must be >= 1")
        check(self.nodes >= 1, f"{path}.nodes", f"got {self.nodes}; must be >= 1")
        check(self.workers % self.nodes == 0, f"{path}.workers",
              f"got {self.workers} workers over {self.nodes} nodes; workers must be a multiple of nodes "
              "(every node runs the same number of workers)")
        check(self.cpus_per_worker >= 1, f"{path}.cpus_per_worker", f"got {self.cpus_per_worker}; must be >= 1")
        check(self.torch_threads >= 1, f"{path}.torch_threads", f"got {self.torch_threads}; must be >= 1")
        for name in ("workers", "nodes", "cpus_per_worker", "torch_threads"):
            check(getattr(self, name) <= COUNT_MAX, f"{path}.{name}",
                  f"got {getattr(self, name)}; must be at most {COUNT_MAX}")


TIMEOUT_MAX_S = 7 * 24 * 3600  # timeouts past a week are a typo; larger values overflow timedelta/sleep
COUNT_MAX = 1_000_000  # restarts, rollbacks, workers, threads: beyond any real job


def check_timeout(value: float, path: str, allow_zero: bool = False) -> None:
    low = "0 (off)" if allow_zero else "> 0"
    check((value >= 0 if allow_zero else value > 0) and value <= TIMEOUT_MAX_S, path,
          f"got {value}; must be {low} and at most {TIMEOUT_MAX_S} seconds (7 days)")


SEED_MAX = 2**31 - 1  # torch/megatron seed offsets (step, rank, TP rank) are added to it and must stay in int64


@dataclass(frozen=True)
class TrainSpec:
    steps: int
    """Optimizer steps to run in total (a resumed run continues up to this count)."""
    seq_len: int
    """Tokens per sample."""
    micro_batch_size: int
    """Samples per worker per forward/backward."""
    global_batch_size: int
    """Samples per optimizer step over all data-parallel ranks (= micro * grad_accum * dp)."""
    lr: float
    """Peak learning rate."""
    seed: int = 1234
    """Seed for weights, data order and every other random choice."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    schedule_steps: int | None = None
    """Steps the warm-up + cosine decay spans (the LR is min_lr past it). null: `steps` of a new run; on
    `--resume`, the span recorded in the checkpoint, so training on with more `steps` keeps the LR curve
    continuous. Set it on a resume to re-plan the decay (the LR then changes at the resumed step)."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    log_every: int = 1
    """Log metrics every this many steps."""
    eval_every: int = 0
    """Evaluate held-out loss every this many steps (0: only at the end)."""
    eval_batches: int = 2
    """Global batches of held-out data per evaluation."""
    aux_loss_coef: float = 0.01
    """Weight of the MoE load-balancing loss in the total loss."""
    router_z_loss_coef: float = 0.0
    """Weight of the MoE router z-loss (ST-MoE: the token mean of logsumexp(router logits)^2, summed over
    MoE layers) in the total loss; keeps router logits small (1e-3 is a common start; 0 = off)."""
    overlap_grad_reduce: bool = False
    """megatron engine: start each gradient bucket's data-parallel reduction during the last micro-batch's
    backward instead of after it (Megatron-LM's --overlap-grad-reduce). Same gradients; pp must be 1."""
    overlap_moe_comm: bool = False
    """megatron engine, MoE with layout.ep > 1: hide the expert-parallel all-to-all (token dispatch and
    combine) behind another micro-batch's attention/expert compute, one micro-batch's forward running
    layer by layer beside the previous one's backward on two CUDA streams (megatron-core's
    overlap_moe_expert_parallel_comm, Megatron-LM's --overlap-moe-expert-parallel-comm). Same gradients up
    to summation order; pp > 1 needs layout.vpp > 1."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation (memory for compute). `none`: keep every activation. `selective`: recompute
    the sequence mixers' inner part in backward (MLP and MoE layers keep their activations): megatron: core
    attention (megatron's selective recompute) and the chunked core of Gated DeltaNet / Mamba2 layers;
    deepspeed: each attention / linear-sequence layer's whole mixer. `full`: recompute every layer from
    its input (megatron: each TransformerLayer, uniform method, one layer per unit; deepspeed: each
    reference layer). Same loss and gradients; `raytron plan`'s memory estimate follows it."""
    precision: Literal["auto", "fp32", "bf16", "fp8"] = "auto"
    """Compute precision; master weights and Adam state stay fp32 in every mode, and checkpoints are the
    same (a run resumes under another precision). auto: bf16 on GPUs, fp32 on CPU. bf16: bf16 weights,
    activations and gradients (deepspeed: its `bf16` mode, on GPUs and on CPU). fp32: fp32 throughout
    (deepspeed only). fp8 (megatron engine, CUDA GPUs of compute capability >= 8.9): the transformer linear
    layers (attention QKV and output projection, MLP fc1/fc2, shared experts) and the routed MoE experts
    multiply in FP8 (ops/fp8.py: per-tensor current scaling, e4m3 forward, e5m2 gradients; experts rowwise
    e4m3), writing bf16; embeddings, the output logits, the router, norms and hybrid mixers' projections
    stay bf16."""

    def validate(self, path: str) -> None:
        for name in ("steps", "seq_len", "micro_batch_size", "global_batch_size", "log_every", "eval_batches"):
            check(getattr(self, name) >= 1, f"{path}.{name}", f"got {getattr(self, name)}; must be >= 1")
        check(self.lr > 0, f"{path}.lr", f"got {self.lr}; must be > 0")
        check(0 <= self.min_lr <= self.lr, f"{path}.min_lr", f"got {self.min_lr}; must be in [0, lr]")
        check(self.warmup_steps >= 0, f"{path}.warmup_steps", f"got {self.warmup_steps}; must be >= 0")
        check(self.schedule_steps is None or self.schedule_steps >= 1, f"{path}.schedule_steps",
              f"got {self.schedule_steps}; must be >= 1, or null (train.steps, or the resumed checkpoint's)")
        check(self.eval_every >= 0, f"{path}.eval_every", f"got {self.eval_every}; must be >= 0")
        for name in ("aux_loss_coef", "router_z_loss_coef"):
            check(getattr(self, name) >= 0, f"{path}.{name}", f"got {getattr(self, name)}; must be >= 0 (0 = off)")
        check(self.grad_clip >= 0, f"{path}.grad_clip", f"got {self.grad_clip}; must be >= 0 (0 disables)")
        check(0 <= self.seed <= SEED_MAX, f"{path}.seed", f"got {self.seed}; must be in [0, {SEED_MAX}]")


RUN_NAME_MAX = 100
_RUN_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def run_name_problem(name) -> str | None:
    """Why `name` cannot name a run directory `<checkpoint.uri>/<name>/` (None when it can): ASCII letters,
    digits, '-', '_' and '.', starting with a letter or digit (so never '.', '..' or a reserved '_' folder
    such as the data cache), at most RUN_NAME_MAX characters."""
    if not isinstance(name, str) or not name:
        return "set a non-empty name"
    if not set(name) <= _RUN_NAME_CHARS:
        return "use ASCII letters, digits, '-', '_' and '.' only"
    if not name[0].isalnum():
        return ("it must start with a letter or digit (names starting with '.', '_' or '-' are reserved: "
                "'..' would leave the run root, '_data_cache' is the data cache)")
    if len(name) > RUN_NAME_MAX:
        return f"{len(name)} characters; use at most {RUN_NAME_MAX}"
    return None


def check_uri(uri: str, path: str) -> None:
    """Refuse credentials written into a URI (`s3://KEY:SECRET@bucket`): secrets come from the
    environment, never from a config that is copied into run records and logs."""
    scheme, sep, rest = uri.partition("://")
    userinfo = rest.split("/", 1)[0].rpartition("@")[0] if sep else ""
    check(":" not in userinfo, path,
          f"got a URI with a password ({scheme}://***:***@...); put credentials in the environment "
          "(e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), never in the config")
    check(bool(uri.strip()), path, "got an empty URI")


@dataclass(frozen=True)
class SourceSpec:
    uri: str
    """Where the text is: a local path or fsspec URI (file, dir or glob), or `builtin://python-stdlib`
    (the source and docstrings of this Python's standard library: on every machine, no download)."""
    weight: float = 1.0
    """Blend weight relative to the other sources."""
    format: Literal["auto", "text", "jsonl", "parquet", "indexed"] = "auto"
    """How to read the files; `auto` goes by extension (and takes a URI ending in .bin/.idx, or whose
    `<uri>.idx` exists, as `indexed`); `indexed`: `uri` is a prepared .bin/.idx prefix (raytron's or
    megatron's), trained on without tokenizing again."""
    field: str = "text"
    """Field holding the document text in jsonl/parquet."""


@dataclass(frozen=True)
class DataSpec:
    sources: list[SourceSpec]
    """Corpora to train on (blended by weight)."""
    tokenizer: str = "byte"
    """`byte` (UTF-8 bytes + special tokens), or a local path / fsspec URI of a tokenizer.json, a directory
    holding one, a SentencePiece .model or a tiktoken ranks file (read, never downloaded; docs/data.md).
    The model's vocabulary follows it (padded to a multiple of 128)."""
    cache_uri: str | None = None
    """Where prepared .bin/.idx and sample indices are cached (default: <checkpoint.uri>/_data_cache)."""
    valid_fraction: float = 0.02
    """Fraction of documents held out for validation loss."""
    max_documents: int | None = None
    """Read at most this many documents per source (for quick runs)."""
    reset_at_documents: bool = False
    """Packed samples hold documents end to end. true: attention stays inside each document and Gated
    DeltaNet / Mamba2 layers restart their state and short convolution at each document start, so a
    document trains as if it were alone (every position still counts in the loss, including the one whose
    target is the next document's first token). false: each sample is one causal sequence."""

    def validate(self, path: str) -> None:
        check(len(self.sources) >= 1, f"{path}.sources", "got an empty list; at least one source is required")
        check(bool(self.tokenizer.strip()), f"{path}.tokenizer", "got an empty name; use byte or a tokenizer path")
        check_uri(self.tokenizer, f"{path}.tokenizer")
        if self.cache_uri is not None:
            check_uri(self.cache_uri, f"{path}.cache_uri")
            check(not self.cache_uri.startswith("memory://"), f"{path}.cache_uri",
                  f"got {self.cache_uri!r}; memory:// lives inside one process and the workers read the prepared "
                  "data from their own: use a local directory or shared storage, or leave it null")
        check(self.max_documents is None or self.max_documents >= 1, f"{path}.max_documents",
              f"got {self.max_documents}; must be >= 1 or null")
        check(0.0 < self.valid_fraction < 0.5, f"{path}.valid_fraction", f"got {self.valid_fraction}; must be in (0, 0.5)")
        for i, src in enumerate(self.sources):
            check(src.weight > 0, f"{path}.sources[{i}].weight", f"got {src.weight}; must be > 0")
            check_uri(src.uri, f"{path}.sources[{i}].uri")
            check(bool(src.field.strip()), f"{path}.sources[{i}].field",
                  "got an empty field name; set the jsonl/parquet field that holds the text (default: text)")


@dataclass(frozen=True)
class CheckpointSpec:
    uri: str
    """Root of all runs: `<uri>/<name>/` holds checkpoints, TensorBoard and the run record (fsspec URI)."""
    every: int = 0
    """Save every this many steps (0: only at the end)."""
    keep: int = 2
    """Committed checkpoints kept (older ones are deleted after a newer one commits); >= 2."""
    async_save: bool = False
    """Write shards in a background thread while training continues."""

    def validate(self, path: str) -> None:
        check_uri(self.uri, f"{path}.uri")
        check(self.every >= 0, f"{path}.every", f"got {self.every}; must be >= 0 (0: only at the end)")
        check(self.keep >= 2, f"{path}.keep", f"got {self.keep}; must be >= 2 so a bad newest step has a fallback")
        check(self.keep <= COUNT_MAX, f"{path}.keep", f"got {self.keep}; must be at most {COUNT_MAX}")
        check(not self.uri.startswith("memory://"), f"{path}.uri",
              f"got {self.uri!r}; memory:// lives inside one process, and every worker is a process of its own "
              "(their shards would never meet): use a local directory or shared storage such as s3://")


@dataclass(frozen=True)
class FaultInjectSpec:
    """TEST HOOK, never for real runs: make one rank misbehave at one step, so the fault-tolerance
    tests can exercise every recovery path end to end (see launcher/fault_inject.py)."""

    kind: Literal["exception", "hang", "nan", "pause"]
    """`exception`: raise on the rank mid-step; `hang`: the rank stops calling collectives (sleeps);
    `nan`: poison one weight on the rank so its loss is NaN; `pause`: write a marker with the rank's
    PID under <run>/worker_groups/ and sleep `seconds` mid-step (a test then kills/SIGTERMs it)."""
    step: int
    """Step at which the fault fires."""
    rank: int = 0
    """World rank that misbehaves."""
    attempt: int = 0
    """Worker-group start (0 = the run's first) on which it fires; -1: on every one."""
    seconds: float = 120.0
    """How long `pause` sleeps (it ends early on SIGTERM)."""

    def validate(self, path: str) -> None:
        check(self.step >= 1, f"{path}.step", f"got {self.step}; must be >= 1")
        check(self.rank >= 0, f"{path}.rank", f"got {self.rank}; must be >= 0")
        check(self.attempt >= -1, f"{path}.attempt", f"got {self.attempt}; must be >= 0, or -1 for every attempt")
        check_timeout(self.seconds, f"{path}.seconds")


@dataclass(frozen=True)
class FaultSpec:
    max_failures: int = 0
    """Worker-group restarts after failures (crash, exception, hang, lost node) before the job fails;
    -1: unlimited. Preemptions do not count here (see max_preemptions)."""
    max_preemptions: int = 10
    """Preemptions the job recovers from (SIGTERM to a worker, or a Ray node drain), a budget apart
    from max_failures; -1: unlimited. Past it the job ends `preempted` and can be resumed."""
    preemption_grace_s: float = 60.0
    """After SIGTERM a worker finishes its step and commits a checkpoint; if that takes longer than
    this, the worker exits anyway (then it counts as a failure)."""
    collective_timeout_s: int = 900
    """torch.distributed process-group timeout: any collective (and the rendezvous) that a rank never
    joins fails after this long (Ray Train's TorchConfig(timeout_s))."""
    step_timeout_s: float = 900.0
    """Step watchdog: a rank whose training step (checkpoint save included) makes no progress for this
    long writes its stack to the attempt record and exits, so Ray Train restarts the group; 0: off."""
    nan_policy: Literal["stop", "rollback"] = "stop"
    """NaN/Inf in the loss (any rank) or gradients, caught before the optimizer step: `stop` ends the
    job (no restarts); `rollback` restores the last committed checkpoint and skips the offending data."""
    spike_factor: float = 0.0
    """Loss spike: a step whose loss exceeds this factor times the running mean of recent losses;
    0 disables the check."""
    spike_policy: Literal["warn", "stop", "rollback"] = "rollback"
    """What a loss spike does: log it (`warn`), end the job (`stop`), or roll back and skip (`rollback`)."""
    spike_warmup_steps: int = 10
    """Steps observed before spikes are judged (the running mean needs a history)."""
    skip_batches: int = 1
    """Rollback: global batches skipped starting at the offending step's batch (logged to
    <run>/skipped_samples.jsonl with their sample range)."""
    max_rollbacks: int = 3
    """Rollbacks per worker group before a NaN/spike stops the job."""
    inject: FaultInjectSpec | None = None
    """TEST HOOK ONLY (null in real runs): inject a fault on one rank at one step."""

    def validate(self, path: str) -> None:
        check(self.max_failures >= -1, f"{path}.max_failures", f"got {self.max_failures}; must be >= 0, or -1")
        check(self.max_preemptions >= -1, f"{path}.max_preemptions",
              f"got {self.max_preemptions}; must be >= 0, or -1")
        check_timeout(self.preemption_grace_s, f"{path}.preemption_grace_s")
        check_timeout(self.collective_timeout_s, f"{path}.collective_timeout_s")
        check_timeout(self.step_timeout_s, f"{path}.step_timeout_s", allow_zero=True)
        for name in ("max_failures", "max_preemptions", "max_rollbacks", "skip_batches", "spike_warmup_steps"):
            check(getattr(self, name) <= COUNT_MAX, f"{path}.{name}",
                  f"got {getattr(self, name)}; must be at most {COUNT_MAX}")
        check(self.spike_factor == 0 or self.spike_factor > 1, f"{path}.spike_factor",
              f"got {self.spike_factor}; must be 0 (off) or > 1")
        check(self.spike_warmup_steps >= 1, f"{path}.spike_warmup_steps",
              f"got {self.spike_warmup_steps}; must be >= 1")
        check(self.skip_batches >= 1, f"{path}.skip_batches", f"got {self.skip_batches}; must be >= 1")
        check(self.max_rollbacks >= 0, f"{path}.max_rollbacks", f"got {self.max_rollbacks}; must be >= 0")


@dataclass(frozen=True)
class JobSpec:
    name: str
    """Run name: the run directory is <checkpoint.uri>/<name>/."""
    train: TrainSpec
    data: DataSpec
    checkpoint: CheckpointSpec
    engine: Literal["deepspeed", "megatron"] = "deepspeed"
    """Training engine."""
    model: ModelSpec = field(default_factory=ModelSpec)
    layout: LayoutSpec = field(default_factory=LayoutSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    fault: FaultSpec = field(default_factory=FaultSpec)

    def validate(self, path: str) -> None:
        problem = run_name_problem(self.name)
        check(problem is None, "name", f"got {self.name!r}; {problem}")

    @property
    def run_uri(self) -> str:
        return RunDir.under(self.checkpoint.uri, self.name).uri

    @property
    def run_dir(self) -> RunDir:
        """The paths of this run's records (raytron/run_dir.py)."""
        return RunDir(self.run_uri)

    @property
    def data_cache_uri(self) -> str:
        """Where prepared data is cached: data.cache_uri, else `<checkpoint.uri>/_data_cache`."""
        return self.data.cache_uri or data_cache_under(self.checkpoint.uri)

    def to_dict(self) -> dict:
        return to_dict(self)

    def config_hash(self) -> str:
        """Hash of everything that defines the model and data order (not steps, names or resources)."""
        d = self.to_dict()
        keep = {k: d[k] for k in ("engine", "model", "data")}
        keep["train"] = {k: v for k, v in d["train"].items() if k not in ("steps", "schedule_steps", "log_every", "eval_every")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _split_key(key: str) -> list[str | int]:
    """`data.sources[0].uri` -> ['data', 'sources', 0, 'uri']."""
    if key.count(".") + key.count("[") >= MAX_DEPTH:
        raise ConfigError("--set", f"got a key {len(key)} characters long nested more than {MAX_DEPTH} levels "
                          f"({key[:80]}...); no config field is that deep: check the key")
    parts: list[str | int] = []
    for part in key.split("."):
        name, *indices = part.split("[")
        if not name or any(not i.endswith("]") or not i[:-1].isdigit() for i in indices):
            raise ConfigError("--set", f"got key {key!r}; expected dotted.key or key[index].field")
        parts.append(name)
        parts.extend(int(i[:-1]) for i in indices)
    return parts


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `--set a.b.c=value` (or `a.list[0].field=value`) overrides to a raw config mapping
    (values parsed as YAML scalars)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError("--set", f"got {item!r}; expected dotted.key=value")
        parts = _split_key(key.strip())
        node: Any = raw
        for i, part in enumerate(parts[:-1]):
            where = key.strip() if i == len(parts) - 2 else ".".join(map(str, parts[: i + 1]))
            if isinstance(part, int):
                if not isinstance(node, list) or part >= len(node):
                    raise ConfigError(where, f"--set {key}: no list item [{part}] here")
                node = node[part]
                continue
            if not isinstance(node, dict):
                raise ConfigError(where, f"--set {key}: {type(node).__name__} has no field {part!r}")
            if node.get(part) is None:  # absent or `section:` left empty in YAML
                node[part] = [] if isinstance(parts[i + 1], int) else {}
            node = node[part]
        last = parts[-1]
        if isinstance(last, int):
            if not isinstance(node, list) or last >= len(node):
                raise ConfigError(key.strip(), f"--set {key}: no list item [{last}] here")
        elif not isinstance(node, dict):
            raise ConfigError(key.strip(), f"--set {key}: {type(node).__name__} has no field {last!r}")
        try:
            node[last] = parse_scalar(text)
        except ConfigError as exc:
            raise ConfigError(key.strip() + (f".{exc.path}" if exc.path else ""), exc.message) from None
    return raw


def spec_from_dict(raw: Any, overrides: list[str] = ()) -> JobSpec:
    if not isinstance(raw, dict):
        got = "an empty document" if raw is None else f"a {type(raw).__name__} at the top level"
        raise ConfigError("", f"got {got}; a job config must be a YAML mapping (name:, train:, data:, ...)")
    return build(JobSpec, apply_overrides(raw, list(overrides)))


def load_spec(path: str, overrides: list[str] = (), name: str | None = None) -> JobSpec:
    """Read a job YAML (local path or fsspec URI), apply overrides, validate."""
    try:
        with storage.open_file(path, "r", encoding="utf-8") as f:
            text = f.read(MAX_DOCUMENT_BYTES + 1)  # load_yaml refuses anything longer
    except FileNotFoundError:
        raise ConfigError("", f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError, storage.StorageError) as exc:
        raise ConfigError("", f"cannot read config {path}: {exc}") from None
    raw = load_yaml(text, str(path))
    if name is not None and isinstance(raw, dict):
        raw = {**raw, "name": name}  # --name is text as given (YAML would read 123 as a number)
    spec = spec_from_dict(raw, overrides)
    return spec


def spec_to_yaml(spec: JobSpec) -> str:
    import yaml

    return yaml.safe_dump(spec.to_dict(), sort_keys=False)


def replace(spec: JobSpec, **changes) -> JobSpec:
    return dataclasses.replace(spec, **changes)


__all__ = ["JobSpec", "ModelSpec", "LayoutSpec", "ResourcesSpec", "TrainSpec", "DataSpec", "SourceSpec",
           "CheckpointSpec", "FaultSpec", "FaultInjectSpec", "ConfigError", "load_spec", "spec_from_dict", "spec_to_yaml",
           "apply_overrides", "Path"]


def resolve_local_paths(spec: JobSpec) -> JobSpec:
    """The spec with relative local paths (checkpoint root, data cache, data sources) made absolute.

    The driver calls this before any worker starts: Ray workers run in their own working directory,
    so `./runs` would otherwise name a different place on every process."""
    data = dataclasses.replace(
        spec.data,
        cache_uri=None if spec.data.cache_uri is None else storage.absolute_uri(spec.data.cache_uri),
        sources=tuple(src if src.uri.startswith("builtin://")
                      else dataclasses.replace(src, uri=storage.absolute_uri(src.uri))
                      for src in spec.data.sources))
    checkpoint = dataclasses.replace(spec.checkpoint, uri=storage.absolute_uri(spec.checkpoint.uri))
    model = spec.model if spec.model.init_from is None else dataclasses.replace(
        spec.model, init_from=storage.absolute_uri(spec.model.init_from))
    return dataclasses.replace(spec, data=data, checkpoint=checkpoint, model=model)
