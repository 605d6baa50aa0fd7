"""The HPU emulation's own fidelity.

It is an emulation on CPU memory: it proves placement and sync discipline, not
Gaudi speed. Results on emulated tensors are checked against the same ops on
plain CPU tensors.
"""

import contextlib
import importlib.util
import os
import sys

import pytest
import torch

from lmcache.testing.hpu_emulation import EmulatedHpuTensor, HpuEmulation
from tests.helpers.hpu import emulated_hpu

HPU0 = torch.device("hpu", 0)


def _is_hpu(t):
    return isinstance(t, EmulatedHpuTensor) and t.device == HPU0


# -- factories and transfers --------------------------------------------------


def test_factories_make_hpu_tensors(hpu_emu):
    made = {
        "empty": torch.empty(2, 3, device="hpu"),
        "zeros": torch.zeros(2, 3, device="hpu"),
        "ones": torch.ones(2, 3, dtype=torch.bfloat16, device="hpu"),
        "full": torch.full((4,), 7, device="hpu"),
        "randn": torch.randn(2, 3, device="hpu"),
        "arange": torch.arange(10, device="hpu"),
        "tensor": torch.tensor([[1, 2], [3, 4]], device="hpu"),
        "empty_like": torch.empty_like(torch.zeros(5, device="hpu")),
    }
    for name, t in made.items():
        assert _is_hpu(t), name
    assert torch.equal(hpu_emu.to_cpu(made["zeros"]), torch.zeros(2, 3))
    assert torch.equal(hpu_emu.to_cpu(made["ones"]), torch.ones(2, 3, dtype=torch.bfloat16))
    assert torch.equal(hpu_emu.to_cpu(made["full"]), torch.full((4,), 7))
    assert torch.equal(hpu_emu.to_cpu(made["arange"]), torch.arange(10))
    assert made["arange"].shape == (10,)  # out= result resized in place
    assert hpu_emu.to_cpu(made["tensor"]).tolist() == [[1, 2], [3, 4]]
    assert made["ones"].dtype == torch.bfloat16


def test_to_and_from_hpu(hpu_emu):
    src = torch.randn(6, 4)
    for non_blocking in (False, True):
        dev = src.to("hpu", non_blocking=non_blocking)
        assert _is_hpu(dev)
        back = dev.to("cpu", non_blocking=non_blocking)
        assert type(back) is torch.Tensor and back.device.type == "cpu"
        assert torch.equal(back, src)
    dev = src.to(HPU0)
    assert dev.to("hpu") is dev  # already there: no copy, as on a real device
    host = dev.cpu()
    host.zero_()  # a copy: the device tensor keeps its data
    assert torch.equal(dev.cpu(), src)
    assert dev.to(torch.float16).dtype == torch.float16 and _is_hpu(dev.to(torch.float16))


def test_copy_between_hpu_views_and_cpu(hpu_emu):
    ref = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    dev = torch.zeros(6, 8, device="hpu")
    dev.t()[2:5].copy_(ref.t()[2:5], non_blocking=True)  # non-contiguous hpu destination
    expected = torch.zeros(6, 8)
    expected.t()[2:5] = ref.t()[2:5]
    assert torch.equal(dev.cpu(), expected)
    host = torch.empty(3, 6)
    host.copy_(dev[:, 1:7:2].t(), non_blocking=True)  # non-contiguous hpu source
    assert torch.equal(host, expected[:, 1:7:2].t())
    dev[0:1] = torch.full((1, 8), 5.0)  # slice assignment from cpu is a copy
    assert dev.cpu()[0].tolist() == [5.0] * 8


VIEW_OPS = {
    "view": lambda t: t.view(4, 24),
    "reshape": lambda t: t.reshape(-1, 6),
    "transpose": lambda t: t.transpose(0, 2),
    "permute": lambda t: t.permute(2, 0, 1),
    "narrow": lambda t: t.narrow(1, 1, 3),
    "select": lambda t: t.select(2, 5),
    "unflatten": lambda t: t.unflatten(2, (2, 4)),
    "flatten": lambda t: t.flatten(0, 1),
    "view_dtype": lambda t: t.view(torch.int32),
    "contiguous": lambda t: t.transpose(0, 1).contiguous(),
    "index_neg_slice": lambda t: t[1:, ::2, -1],
}


@pytest.mark.parametrize("name", sorted(VIEW_OPS))
def test_views_match_cpu(hpu_emu, name):
    ref = torch.randn(2, 6, 8)
    dev = ref.to("hpu")
    out = VIEW_OPS[name](dev)
    expected = VIEW_OPS[name](ref)
    assert _is_hpu(out)
    assert out.shape == expected.shape and out.stride() == expected.stride()
    assert out.is_contiguous() == expected.is_contiguous()
    assert torch.equal(out.cpu(), expected)


def test_views_alias_their_base(hpu_emu):
    dev = torch.zeros(4, 6, device="hpu")
    dev.view(6, 4).select(0, 1).fill_(3.0)
    dev.t()[5].add_(1.0)
    expected = torch.zeros(4, 6)
    expected.view(6, 4).select(0, 1).fill_(3.0)
    expected.t()[5].add_(1.0)
    assert torch.equal(dev.cpu(), expected)


def test_comparison_sees_a_corrupted_element(hpu_emu):
    """The equality checks used here are able to fail."""
    ref = torch.randn(2, 6, 8)
    dev = ref.to("hpu")
    dev[1, 2, 3] += 1.0
    assert not torch.equal(dev.cpu(), ref)
    assert not torch.allclose(dev, ref.to("hpu"))
    assert not torch.equal(VIEW_OPS["transpose"](dev).cpu(), VIEW_OPS["transpose"](ref))


def test_in_place_metadata_ops_stay_truthful(hpu_emu):
    t = torch.empty(0, device="hpu")
    t.resize_(3, 2)
    assert t.shape == (3, 2) and t.stride() == (2, 1)
    u = torch.zeros(2, 3, device="hpu")
    u.unsqueeze_(0)
    u.transpose_(1, 2)
    assert u.shape == (1, 3, 2) and not u.is_contiguous()
    out = torch.empty(0, device="hpu")
    idx = torch.tensor([2, 0], device="hpu")
    torch.index_select(torch.arange(6.0, device="hpu"), 0, idx, out=out)
    assert out.shape == (2,) and out.cpu().tolist() == [2.0, 0.0]


# -- index ops used by KV connectors -----------------------------------------


def test_index_select_index_copy_round_trip(hpu_emu):
    kv = torch.randn(32, 4, 8).to("hpu")
    slots = torch.tensor([5, 17, 2, 30, 9], device="hpu")
    gathered = kv.index_select(0, slots)
    assert _is_hpu(gathered)
    host = gathered.to("cpu")
    assert torch.equal(host, kv.cpu()[[5, 17, 2, 30, 9]])

    restored = torch.zeros(32, 4, 8, device="hpu")
    restored.index_copy_(0, slots, host.to("hpu", non_blocking=True))
    expected = torch.zeros(32, 4, 8)
    expected[[5, 17, 2, 30, 9]] = kv.cpu()[[5, 17, 2, 30, 9]]
    assert torch.equal(restored.cpu(), expected)


def test_advanced_indexing(hpu_emu):
    ref = torch.randn(16, 3)
    dev = ref.to("hpu")
    idx_dev = torch.tensor([3, 1, 12], device="hpu")
    idx_cpu = torch.tensor([3, 1, 12])
    assert torch.equal(dev[idx_dev].cpu(), ref[idx_cpu])
    assert torch.equal(dev[idx_cpu].cpu(), ref[idx_cpu])  # cpu indices allowed, as on CUDA
    values = torch.randn(3, 3)
    dev[idx_dev] = values.to("hpu")
    dev.index_put_((idx_dev,), values.to("hpu") * 2, accumulate=True)
    ref[idx_cpu] = values
    ref.index_put_((idx_cpu,), values * 2, accumulate=True)
    assert torch.equal(dev.cpu(), ref)
    mask = dev > 0
    assert torch.equal(dev[mask].cpu(), ref[ref > 0])


def test_cat_stack_and_comparisons(hpu_emu):
    a, b = torch.randn(2, 5), torch.randn(3, 5)
    da, db = a.to("hpu"), b.to("hpu")
    assert torch.equal(torch.cat([da, db]).cpu(), torch.cat([a, b]))
    assert torch.equal(torch.stack([da, da], dim=1).cpu(), torch.stack([a, a], dim=1))
    assert torch.equal(da, a.to("hpu")) and torch.allclose(da, da.clone())


def test_fp8_index_ops_move_exact_bytes(hpu_emu):
    ref = torch.randn(8, 16).to(torch.float8_e4m3fn)
    dev = ref.to("hpu")
    assert dev.dtype == torch.float8_e4m3fn
    slots = torch.tensor([6, 1, 4], device="hpu")
    picked = dev.index_select(0, slots)
    assert torch.equal(picked.view(torch.uint8).cpu(), ref.view(torch.uint8)[[6, 1, 4]])
    target = torch.zeros(8, 16, dtype=torch.float8_e4m3fn, device="hpu")
    returned = target.index_copy_(0, slots, picked)
    assert returned is target and returned.dtype == torch.float8_e4m3fn
    expected = torch.zeros(8, 16, dtype=torch.uint8)
    expected[[6, 1, 4]] = ref.view(torch.uint8)[[6, 1, 4]]
    assert torch.equal(target.view(torch.uint8).cpu(), expected)
    assert torch.equal(dev[slots].view(torch.uint8).cpu(), ref.view(torch.uint8)[[6, 1, 4]])


# -- inference_mode, no_grad and .to() on the same device ---------------------
# vLLM and LMCache move KV under torch.inference_mode(), into caches allocated
# outside it. Each scenario runs on cpu and on the emulated hpu; the outcomes
# (values, inference-ness, version counters, errors) must be the same.


def _outcome(value, dev, versions):
    """What a scenario produced, comparable across devices."""
    if isinstance(value, torch.Tensor):
        assert value.device.type == dev, f"result on {value.device}, expected {dev}"
        if dev == "hpu":
            assert type(value.cpu_data) is torch.Tensor, "wrapper around a wrapper"
        inference = value.is_inference()  # inference tensors have no version counter
        version = value._version if versions and not inference else None
        return ("tensor", value.dtype, tuple(value.shape), value.stride(),
                inference, version, value.cpu().tolist())
    if isinstance(value, (list, tuple)):
        return tuple(_outcome(v, dev, versions) for v in value)
    return value


def _run_on(scenario, dev, versions):
    try:
        return _outcome(scenario(dev), dev, versions)
    except RuntimeError as exc:
        return ("raised", str(exc).split(" (in emulated HPU op")[0])


def _assert_same_on_cpu_and_hpu(scenario, versions=True):
    on_cpu = _run_on(scenario, "cpu", versions)
    on_hpu = _run_on(scenario, "hpu", versions)
    assert on_hpu == on_cpu
    return on_cpu


@pytest.mark.parametrize("name", sorted(VIEW_OPS))
def test_views_in_inference_mode_of_tensors_made_outside(hpu_emu, name):
    def scenario(dev):
        base = torch.arange(96.0).reshape(2, 6, 8).to(dev)
        with torch.inference_mode():
            view = VIEW_OPS[name](base)
            view.add_(1)  # writes through to base unless the op copied
        return base, view

    # Versions aside: on cpu, reshape under inference_mode takes _reshape_alias,
    # which (a torch quirk) does not share the base's version counter; a tensor
    # subclass takes view(), which does.
    outcome = _assert_same_on_cpu_and_hpu(scenario, versions=False)
    assert outcome[0][0] == "tensor" and outcome[0][4] is False  # base: normal


def test_writes_in_inference_mode_into_tensors_made_outside(hpu_emu):
    grad_modes = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}

    def scenario(mode):
        def run(dev):
            kv = torch.zeros(8, 2, 4, device=dev)  # vLLM's KV cache: a normal tensor
            chunk = torch.arange(24.0).reshape(3, 2, 4)
            slots = torch.tensor([6, 1, 4], device=dev)
            with grad_modes[mode]():
                kv.index_copy_(0, slots, chunk.to(dev, non_blocking=True))
                kv[2:3].copy_(chunk[:1])
                kv.view(-1)[:4].copy_(torch.ones(4).to(dev))
                kv.select(1, 1)[7].fill_(9.0)
                gathered = kv.index_select(0, slots)
                host = gathered.to("cpu")
            assert type(host) is torch.Tensor and host.device.type == "cpu"
            assert torch.equal(host, kv.cpu()[[6, 1, 4]])
            return kv, gathered
        return run

    for mode in grad_modes:
        outcome = _assert_same_on_cpu_and_hpu(scenario(mode))
        assert outcome[0][4] is False and outcome[0][5] > 0  # kv: normal, written


def test_inference_tensors_used_outside_inference_mode(hpu_emu):
    def made_inside(dev):
        with torch.inference_mode():
            return torch.arange(6.0).to(dev), torch.ones(6, device=dev)

    def read_outside(dev):
        a, b = made_inside(dev)
        return a[1:4], a.view(2, 3).t(), a + b, b.clone()

    def written_outside(dev):
        a, _ = made_inside(dev)
        a[1:3].add_(1)

    def used_by_autograd(dev):
        a, _ = made_inside(dev)
        weight = torch.ones(6, device=dev, requires_grad=True)
        (weight * a).sum().backward()

    def view_written_outside(dev):
        base = torch.zeros(4, device=dev)
        with torch.inference_mode():
            view = base[1:3]
        view.mul_(torch.ones(2, device=dev, requires_grad=True))

    # Versions aside: a cpu clone of an inference tensor counts its inner copy_.
    read = _assert_same_on_cpu_and_hpu(read_outside, versions=False)
    assert [r[4] for r in read] == [True, True, False, False]
    for scenario in (written_outside, used_by_autograd, view_written_outside):
        outcome = _assert_same_on_cpu_and_hpu(scenario)
        assert outcome[0] == "raised", scenario.__name__


def test_to_the_same_device_returns_the_tensor_itself(hpu_emu):
    for mode in (contextlib.nullcontext, torch.no_grad, torch.inference_mode):
        with mode():
            t = torch.arange(6.0, device="hpu")
            for same in (
                t.to("hpu"),
                t.to(HPU0),
                t.to("hpu", torch.float32),
                t.to(torch.empty(1, device="hpu")),
                t.to(device="hpu", non_blocking=True),
                torch.as_tensor(t),
                torch.as_tensor(t, device="hpu"),
                torch.as_tensor(t, dtype=torch.float32, device=HPU0),
            ):
                assert same is t, mode
            changed = {
                "to dtype": t.to("hpu", torch.float16),
                "to copy": t.to("hpu", copy=True),
                "as_tensor dtype": torch.as_tensor(t, dtype=torch.float64),
                "as_tensor dtype device": torch.as_tensor(t, dtype=torch.int32, device="hpu"),
                "type_as": t.type_as(torch.empty(1, dtype=torch.int64, device="hpu")),
            }
            for name, other in changed.items():
                assert _is_hpu(other) and type(other.cpu_data) is torch.Tensor, (mode, name)
                assert other is not t and other.cpu().tolist() == t.cpu().tolist(), (mode, name)
            host = t.to("cpu")
            assert type(host) is torch.Tensor and host.device.type == "cpu", mode
            assert type(torch.as_tensor(t, device="cpu")) is torch.Tensor, mode


def test_a_wrapper_must_hold_a_plain_cpu_tensor(hpu_emu):
    t = torch.zeros(2, device="hpu")
    with pytest.raises(RuntimeError, match="must hold a plain CPU tensor"):
        EmulatedHpuTensor(t, HPU0)


# -- device placement -----------------------------------------------------------


MIXED_OPS = {
    "add": lambda d, c: d + c,
    "cat": lambda d, c: torch.cat([d, c]),
    "index_select_cpu_index": lambda d, c: d.index_select(0, torch.tensor([0])),
    "index_copy_cpu_source": lambda d, c: d.index_copy_(0, torch.tensor([0, 1], device="hpu"), c),
    "cpu_index_select_hpu_index": lambda d, c: c.index_select(0, torch.tensor([0], device="hpu")),
    "index_put_cpu_values": lambda d, c: d.index_put_((torch.tensor([0, 1]),), c),
    "equal": lambda d, c: torch.equal(d, c),
}


@pytest.mark.parametrize("name", sorted(MIXED_OPS))
def test_mixing_hpu_and_cpu_raises(hpu_emu, name):
    dev, host = torch.zeros(2, 3, device="hpu"), torch.ones(2, 3)
    with pytest.raises(RuntimeError, match="Expected all tensors to be on the same device.*hpu:0 and cpu"):
        MIXED_OPS[name](dev, host)


def test_cpu_tensor_indexed_by_hpu_indices_raises(hpu_emu):
    with pytest.raises(RuntimeError, match="indices should be either on cpu or on the same device"):
        torch.zeros(4)[torch.tensor([1], device="hpu")]


def test_zero_dim_cpu_tensor_joins_as_a_scalar(hpu_emu):
    out = torch.ones(3, device="hpu") * torch.tensor(2.0)
    assert _is_hpu(out) and out.cpu().tolist() == [2.0, 2.0, 2.0]


def test_host_only_conversions(hpu_emu):
    dev = torch.arange(4, device="hpu")
    assert dev.tolist() == [0, 1, 2, 3]
    assert int(dev[2]) == 2 and f"{dev[3].float():.1f}" == "3.0"
    with pytest.raises(TypeError, match="can't convert hpu:0 device type tensor to numpy"):
        dev.numpy()
    assert "device='hpu:0'" in repr(dev)


def test_several_devices():
    with emulated_hpu(device_count=2) as emu:
        assert torch.hpu.device_count() == 2
        on0 = torch.zeros(2, device="hpu")
        torch.hpu.set_device(1)
        on1 = torch.zeros(2, device="hpu")
        assert on0.device == HPU0 and on1.device == torch.device("hpu", 1)
        assert on0.to("hpu:1").device.index == 1
        assert emu.device.index == 1
        with pytest.raises(RuntimeError, match="same device.*hpu:1 and hpu:0|same device.*hpu:0 and hpu:1"):
            on0 + on1
        with pytest.raises(RuntimeError, match="invalid hpu device index 2"):
            torch.zeros(1, device="hpu:2")


# -- graph breaks, synchronizes, streams ---------------------------------------------


def test_mark_step_and_synchronize_are_counted(hpu_emu):
    import habana_frameworks.torch.core as htcore

    hpu_emu.reset_counters()
    kv = torch.zeros(4, 4, device="hpu")
    kv.index_copy_(0, torch.tensor([1], device="hpu"), torch.ones(1, 4, device="hpu"))
    assert hpu_emu.counters.ops_since_mark_step > 0
    htcore.mark_step()
    assert hpu_emu.counters.mark_steps == 1 and hpu_emu.counters.ops_since_mark_step == 0
    torch.hpu.synchronize()
    torch.hpu.synchronize()
    assert hpu_emu.counters.synchronizes == 2
    htcore.mark_step(sync=True)
    assert hpu_emu.counters.mark_steps == 2 and hpu_emu.counters.synchronizes == 3
    hpu_emu.reset_counters()
    assert hpu_emu.counters.mark_steps == 0 and hpu_emu.counters.synchronizes == 0


def test_lazy_switch(hpu_emu):
    from habana_frameworks.torch.utils.internal import is_lazy

    assert is_lazy() is True
    hpu_emu.set_lazy(False)
    assert is_lazy() is False
    torch.ones(2, device="hpu").add_(1)
    assert hpu_emu.counters.ops_since_mark_step == 0  # eager: nothing waits for a graph break
    hpu_emu.set_lazy(True)
    assert is_lazy() is True


def test_streams_and_events(hpu_emu):
    default = torch.hpu.current_stream()
    side = torch.hpu.Stream()
    with torch.hpu.stream(side):
        assert torch.hpu.current_stream() is side
    assert torch.hpu.current_stream() is default
    event = side.record_event()
    assert event.query()
    event.synchronize()
    side.synchronize()
    assert hpu_emu.counters.event_synchronizes == 1
    assert hpu_emu.counters.stream_synchronizes == 1


# -- turning it on and off ---------------------------------------------------------


def _global_state():
    return {
        "torch_has_hpu": hasattr(torch, "hpu"),
        "torch.hpu module": sys.modules.get("torch.hpu"),
        "habana modules": sorted(m for m in sys.modules if m.startswith("habana_frameworks")),
        "find_spec": importlib.util.find_spec("habana_frameworks"),
        "cuda_is_available": torch.cuda.is_available,
        "cuda_answer": torch.cuda.is_available(),
        "migration_env": os.environ.get("PT_HPU_GPU_MIGRATION"),
        "LMCACHE_DEVICE": os.environ.get("LMCACHE_DEVICE"),
    }


def test_state_restored_after_the_fixture(monkeypatch):
    from lmcache.platforms import current_platform, make_platform, set_platform

    monkeypatch.setenv("LMCACHE_DEVICE", "cpu")
    before_platform = make_platform("cpu")
    previous = set_platform(before_platform)
    try:
        before = _global_state()
        for migration in (False, True):  # re-activation in one process works
            with emulated_hpu(gpu_migration=migration):
                assert current_platform().device_type == "hpu"
                assert torch.cuda.is_available() is (migration or before["cuda_answer"])
                changed = _global_state()
                assert changed != before
                assert _is_hpu(torch.ones(1, device="hpu"))
            assert _global_state() == before
            assert current_platform() is before_platform
        with pytest.raises(NotImplementedError, match="HPU"):
            torch.empty(1, device="hpu")
    finally:
        set_platform(previous)


def test_refuses_a_second_activation(hpu_emu):
    with pytest.raises(RuntimeError, match="another HpuEmulation is active"):
        HpuEmulation().activate()
    with pytest.raises(RuntimeError, match="already active"):
        hpu_emu.activate()


def test_refuses_when_a_real_bridge_is_importable(tmp_path, monkeypatch):
    fake_real = tmp_path / "habana_frameworks"
    fake_real.mkdir()
    (fake_real / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    before = _global_state()
    emu = HpuEmulation()
    with pytest.raises(RuntimeError, match="refusing to emulate HPU: a real Habana bridge is present"):
        emu.activate()
    assert not emu.active and _global_state() == before
    assert "habana_frameworks" not in sys.modules


def test_stand_in_modules_are_findable_and_marked(hpu_emu):
    import habana_frameworks.torch as ht

    for name in (
        "habana_frameworks",
        "habana_frameworks.torch",
        "habana_frameworks.torch.core",
        "habana_frameworks.torch.utils.internal",
    ):
        assert importlib.util.find_spec(name) is not None, name
        assert sys.modules[name].__lmcache_emulation__ is True
    assert ht.hpu is torch.hpu and torch.hpu.is_available()
    assert "emulat" in torch.hpu.get_device_name().lower()
    import lmcache.testing.hpu_emulation as module

    assert "EMULATION" in module.__doc__ and "NOTHING about Gaudi speed" in module.__doc__


def test_op_signatures_are_recorded(hpu_emu):
    """Each distinct (op, shapes, dtypes, other arguments) on hpu tensors is recorded once: the
    emulation's stand-in for a Gaudi graph compile."""
    table = torch.zeros(64, 8, device="hpu")
    hpu_emu.reset_counters()
    for n in (4, 4, 4, 9):
        torch.index_select(table, 0, torch.arange(n).to("hpu"))
    counts = hpu_emu.counters.signatures_per_op()
    assert counts["index_select"] == 2  # shapes [4] and [9]
    assert max(hpu_emu.counters.shapes_per_call().values()) == 2
    torch.zeros(3).index_select(0, torch.arange(2))  # host ops are not recorded
    assert hpu_emu.counters.signatures_per_op()["index_select"] == 2
    hpu_emu.reset_counters()
    assert hpu_emu.counters.signatures == set()
