"""Pinned host memory on HPU: pageable unless forced or a start-up probe succeeds.

vllm-gaudi reports pinned memory as unsupported on HPU. The probe (a pinned round trip
through the device) must never stop start-up: any exception means "no". On the
emulated Gaudi (a CPU-only torch build) pinning itself raises, which is one such case.
"""

import logging

import pytest
import torch

from lmcache.platforms import hpu as hpu_platform
from lmcache.platforms.hpu import PIN_ENV, HpuPlatform


@pytest.fixture
def platform(hpu_emu, monkeypatch):
    monkeypatch.delenv(PIN_ENV, raising=False)
    return HpuPlatform(0)


def test_default_is_pageable_where_the_probe_fails(platform, caplog):
    with caplog.at_level(logging.INFO, logger="lmcache.platforms.hpu"):
        assert platform.pin_available is False
    assert "pageable" in caplog.text
    host = platform.empty_host((4, 8), torch.bfloat16)
    assert not host.is_pinned()


@pytest.mark.parametrize("error", [RuntimeError, SystemError, ValueError, AttributeError])
def test_any_exception_in_the_probe_means_no(platform, monkeypatch, error):
    def broken(*args, **kwargs):
        if kwargs.get("pin_memory"):
            raise error("bridge says no")
        return torch.zeros(*args, **{k: v for k, v in kwargs.items() if k != "pin_memory"})

    monkeypatch.setattr(hpu_platform.torch, "empty", broken)
    assert platform.pin_available is False


def test_a_successful_probe_means_pinned(platform, monkeypatch):
    """The probe's yes path: pinning is stood in for (a CPU-only torch cannot pin), the pinned
    round trip through the (emulated) device runs for real and its bytes come back."""
    real_empty = torch.empty

    def empty_ignoring_pin(*args, **kwargs):
        kwargs.pop("pin_memory", None)
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(hpu_platform.torch, "empty", empty_ignoring_pin)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: True)
    assert platform.pin_available is True


def test_forced_pageable_never_probes(platform, monkeypatch):
    monkeypatch.setenv(PIN_ENV, "0")
    monkeypatch.setattr(HpuPlatform, "_probe_pinning", lambda self: pytest.fail("probed although forced"))
    assert platform.pin_available is False


def test_forced_pinned_falls_back_once_pinning_fails(platform, monkeypatch, caplog):
    monkeypatch.setenv(PIN_ENV, "true")
    assert platform.pin_available is True
    t = torch.zeros(4)
    with caplog.at_level(logging.WARNING, logger="lmcache.platforms.hpu"):
        assert platform.pin(t) is t  # pinning raises on this machine: the buffer stays pageable
    assert platform.pin_available is False and "pageable" in caplog.text


def test_a_bad_setting_is_a_clear_error(platform, monkeypatch):
    monkeypatch.setenv(PIN_ENV, "sometimes")
    with pytest.raises(ValueError, match="accepted: auto"):
        platform.pin_available
