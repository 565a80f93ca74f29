"""ops/self_check.isolated_autograd: a kernel self-check may first run inside a checkpointed forward
(train.recompute) or under no_grad; its own backward must work there and leave the checkpoint alone."""

import pytest
import torch
from torch.utils.checkpoint import CheckpointError, checkpoint

from raytron.ops.self_check import isolated_autograd


def _check() -> None:
    """Stands in for a kernel self-check: a small forward and its gradient."""
    x = torch.randn(5, requires_grad=True)
    (grad,) = torch.autograd.grad((x.exp() * x).sum(), x)
    assert torch.allclose(grad, x.exp() * (x + 1))


def _layer(x, check, ran):
    if not ran:  # the first forward runs the check; the recomputation (check cached) does not
        ran.append(True)
        check()
    return (x.sin() * x).sum()


def test_check_inside_a_checkpointed_forward_leaves_the_recomputation_alone():
    x = torch.randn(4, requires_grad=True)
    checkpoint(_layer, x, isolated_autograd(_check), [], use_reentrant=False).backward()
    torch.testing.assert_close(x.grad, x.detach().cos() * x.detach() + x.detach().sin())


def test_without_isolation_the_checkpoint_refuses():
    """What the isolation prevents: the check's saved tensors counted as the layer's."""
    x = torch.randn(4, requires_grad=True)
    with pytest.raises(CheckpointError):
        checkpoint(_layer, x, _check, [], use_reentrant=False).backward()


def test_check_under_no_grad_still_has_its_gradients():
    with torch.no_grad():
        isolated_autograd(_check)()
