"""The megatron engine's `load_reference` with weights from a transformers checkpoint (what a worker does for
`model.init_from`), on one GPU: the engine's weights are the checkpoint's rounded to bf16, and its held-out
loss matches the fp32 reference model's with those weights (marked `gpu`; skips without CUDA)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu
CONFIG = str(Path(__file__).resolve().parents[2] / "cluster_configs" / "gpu_megatron_2gpu.yaml")
MIXTRAL = dict(vocab_size=264, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5,
               rope_theta=10000.0, max_position_embeddings=256)


@pytest.fixture(scope="module")
def one_rank():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CUDA_DEVICE_MAX_CONNECTIONS="1")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    yield
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    dist.destroy_process_group()


def test_megatron_engine_starts_from_transformers_weights(one_rank):
    transformers = pytest.importorskip("transformers")
    from raytron import models
    from raytron.config.spec import load_spec
    from raytron.launcher.validate import validate_job
    from raytron.launcher.vocab import with_tokenizer_vocab
    from raytron.models.hf_format import from_hf_config, from_hf_state
    from raytron.parallelism.megatron.engine import MegatronEngine

    spec = load_spec(CONFIG, ["resources.workers=1", "layout.ep=1", "layout.dp=1", "train.global_batch_size=4"])
    spec = with_tokenizer_vocab(spec)  # the byte tokenizer's 264 rows
    engine = MegatronEngine(spec, validate_job(spec), 0, 1)
    torch.manual_seed(11)
    hf = transformers.MixtralForCausalLM(transformers.MixtralConfig(**MIXTRAL))
    cfg = from_hf_config(hf.config.to_dict())
    assert cfg == engine.model_cfg.replace(init_std=cfg.init_std)
    ref = from_hf_state(cfg, hf.state_dict())
    engine.load_reference(ref)
    got = engine.export_reference()
    assert set(got) == set(ref)
    for name, value in ref.items():
        assert torch.equal(got[name], value.to(torch.bfloat16).float()), name
    batch = torch.randint(0, 264, (4, spec.train.seq_len + 1), generator=torch.Generator().manual_seed(0))
    model = models.Transformer(cfg)
    model.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in ref.items()})
    with torch.no_grad():
        logits = model.eval()(batch[:, :-1])
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)).item()
    assert abs(engine.eval_loss([batch]) - want) < 2e-2
