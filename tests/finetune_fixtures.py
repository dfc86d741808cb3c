"""Fixtures the fine-tuning tests share: one torch thread, and a local CIFAR ResNet-20 checkpoint."""

from __future__ import annotations

import pytest
import torch

from extract.registry.models import build_network

MODEL = "cifar_resnet20"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions run faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def init_weights(tmp_path_factory):
    """A local checkpoint file (a 'pretrained' backbone, so the new layer gets the head multiplier), so the
    starting weights of a run are known exactly."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "tiny.pth"
    torch.save(build_network(MODEL).state_dict(), path)
    return path
