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
