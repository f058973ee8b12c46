"""Nothing lost to a damaged run folder: what a kill, a full disk or a second job leaves
behind, met by the next run of the same folder (real trainer processes)."""
import json

import pytest

from tests.helpers.trainer_runs import cpu_env, explain, run, single, train_args


@pytest.mark.timeout(240)
def test_a_cut_last_log_line_is_read_past_and_the_next_append_starts_a_new_line(demo_shards, tmp_path):
    """A kill or a full disk during an append cuts metrics.jsonl's and train_log.jsonl's
    last line: the resumed run (its best checkpoint read from metrics.jsonl at start-up)
    warns, trains on, and every line it appends is whole."""
    run_dir = tmp_path / "run"
    args = train_args(run_dir, demo_shards, "--train.eval_every=2", "--train.ckpt_every=2",
                      "--train.best_metric=l1")
    first = run(single([*args, "--train.max_steps=2"]), cpu_env())
    assert first.returncode == 0, explain(first)
    cut = '{"step": 3, "l1": 0.2'  # no newline: the process died mid-write
    for name in ("metrics.jsonl", "train_log.jsonl"):
        with open(run_dir / name, "a") as f:
            f.write(cut)

    second = run(single([*args, "--train.max_steps=4", "--train.resume=auto"]), cpu_env())
    assert second.returncode == 0, explain(second)
    assert "metrics.jsonl: line" in second.stderr and "not a whole JSON record" in second.stderr
    assert "Traceback" not in second.stderr
    steps = {}
    for name in ("metrics.jsonl", "train_log.jsonl"):
        lines = (run_dir / name).read_text().splitlines()
        assert cut in lines  # the fragment kept on its own line, not glued to the next record
        steps[name] = [json.loads(line)["step"] for line in lines if line != cut]
    assert steps == {"metrics.jsonl": [0, 2, 4], "train_log.jsonl": [1, 2, 3, 4]}
