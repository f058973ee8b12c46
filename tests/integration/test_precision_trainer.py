"""bf16 only where the hardware computes it: the real trainer acting on precision's decision."""
import pytest

from pipeline import precision
from tests.helpers.trainer_runs import cpu_env, explain, run, single, train_args


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_the_trainer_runs_bf16_only_where_this_cpu_computes_it(demo_shards, tmp_path):
    """Both branches cannot run on one machine: this one takes the branch its CPU
    calls for (the notice, the precision and the layout in the run's environment record
    agree; at batch 2 a bf16 CPU (AMX, AVX-512 BF16) trains bf16 in channels_last)."""
    args = train_args(tmp_path / "run", demo_shards, "--train.max_steps=2", "--data.batch_size=2",
                      "--train.allow_emulated_bf16=false")  # the last value of a key wins
    result = run(single(args), cpu_env(ACCELERATE_MIXED_PRECISION="bf16"))
    assert result.returncode == 0, explain(result)
    native = precision.native_bf16("cpu")
    used = "bf16" if native else "no"
    assert f'"mixed_precision": "{used}"' in result.stdout
    layout = precision.channels_last("auto", used, "cpu", batch_size=2)
    assert f'"channels_last": {str(layout).lower()}' in result.stdout
    assert ("only emulates it" in result.stdout) == (not native)
    assert "allow_emulated_bf16: false" in (tmp_path / "run" / "config.yaml").read_text()
