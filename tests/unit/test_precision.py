"""bf16 only where the hardware computes it: the decision (the trainer acting on it:
tests/integration/test_precision_trainer.py)."""
import pytest

from pipeline import precision


def test_bf16_is_kept_where_the_hardware_computes_it():
    assert precision.resolve("bf16", "cpu", native=True, allow_emulated=False) == ("bf16", None)
    assert precision.resolve("bf16", "cuda", native=True, allow_emulated=False) == ("bf16", None)


def test_fp32_is_never_changed():
    assert precision.resolve("no", "cpu", native=False, allow_emulated=False) == ("no", None)


@pytest.mark.parametrize("device_type, hardware", [("cpu", "AVX512-BF16"), ("cuda", "Ampere")])
def test_emulated_bf16_falls_back_to_fp32_and_says_how_to_keep_it(device_type, hardware):
    chosen, notice = precision.resolve("bf16", device_type, native=False, allow_emulated=False)
    assert chosen == "no"
    assert hardware in notice and "fp32" in notice and "train.allow_emulated_bf16=true" in notice


def test_emulated_bf16_is_kept_when_allowed_with_a_warning():
    chosen, notice = precision.resolve("bf16", "cpu", native=False, allow_emulated=True)
    assert chosen == "bf16" and "emulated" in notice


AMX = precision.CPU(avx512_bf16=True, amx=True)
AVX512_BF16 = precision.CPU(avx512_bf16=True, amx=False)
AVX2 = precision.CPU(avx512_bf16=False, amx=False)


@pytest.mark.parametrize("cpu", [AMX, AVX512_BF16, AVX2])
@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_fp32_runs_stay_nchw_on_every_machine(cpu, device_type):
    assert not any(precision.channels_last("auto", "no", device_type, batch, cpu) for batch in (1, 4, 64))


def test_bf16_goes_channels_last_where_it_measured_faster():
    # native bf16 (AMX, AVX-512 BF16): oneDNN's NHWC kernels, faster from a batch of 2;
    # at batch 1 NCHW is as fast or faster
    for cpu in (AMX, AVX512_BF16):
        assert not precision.channels_last("auto", "bf16", "cpu", 1, cpu)
        assert precision.channels_last("auto", "bf16", "cpu", 2, cpu)
        assert precision.channels_last("auto", "bf16", "cpu", 16, cpu)
    # bf16 emulated (AVX2 only): NCHW
    assert not precision.channels_last("auto", "bf16", "cpu", 16, AVX2)
    assert precision.channels_last("auto", "bf16", "cuda", 1, AVX2)


@pytest.mark.parametrize("setting", [True, False])
def test_an_explicit_layout_setting_wins_over_the_hardware(setting):
    for used, device_type, cpu in (("no", "cpu", AVX2), ("bf16", "cpu", AMX), ("bf16", "cuda", AMX)):
        assert precision.channels_last(setting, used, device_type, 4, cpu) is setting


def test_this_cpu_is_read_from_torchs_own_probes(monkeypatch):
    monkeypatch.setattr("torch.cpu._is_amx_tile_supported", lambda: False)
    monkeypatch.setattr("torch.cpu._is_avx512_bf16_supported", lambda: True)
    assert precision.CPU.this() == AVX512_BF16
    assert precision.channels_last("auto", "bf16", "cpu", 4)
    monkeypatch.setattr("torch.cpu._is_avx512_bf16_supported", lambda: False)
    assert precision.CPU.this() == AVX2
    assert not precision.channels_last("auto", "bf16", "cpu", 4)
