"""The HPU emulation's own fidelity (it is an emulation: placement and sync, not speed)."""

import torch


def test_factory_and_roundtrip(hpu_emu):
    src = torch.randn(6, 4)
    dev = hpu_emu.to_cpu(src.to("hpu"))
    assert torch.equal(dev, src)
