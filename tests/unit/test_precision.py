"""bf16 only where the hardware computes it: the decision, and the trainer acting on it."""
import pytest

from pipeline import precision
from tests.trainer_runs import cpu_env, explain, run, single, train_args


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


@pytest.mark.timeout(200)
def test_the_trainer_runs_bf16_only_where_this_cpu_computes_it(demo_shards, tmp_path):
    """Both branches cannot run on one machine: this one takes the branch its CPU
    calls for (the notice and the precision in the run's environment record agree)."""
    args = train_args(tmp_path / "run", demo_shards, "--train.max_steps=2",
                      "--train.allow_emulated_bf16=false")  # the last value of a key wins
    result = run(single(args), cpu_env(ACCELERATE_MIXED_PRECISION="bf16"))
    assert result.returncode == 0, explain(result)
    native = precision.native_bf16("cpu")
    used = "bf16" if native else "no"
    assert f'"mixed_precision": "{used}"' in result.stdout
    assert ("only emulates it" in result.stdout) == (not native)
    assert "allow_emulated_bf16: false" in (tmp_path / "run" / "config.yaml").read_text()
