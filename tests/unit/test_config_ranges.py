"""Every config input checked where it enters (issue #39): each numeric field's declared
range, YAML read as the command line is read, a bad config file in one line, freeze(), and
shard.py's numeric flags. In-process: the messages are exact, one line, no traceback."""
from __future__ import annotations

import copy
import dataclasses
import math

import pytest

from data_tools import shard
from pipeline import cli
from pipeline.config import (
    Config,
    ConfigError,
    build_parser,
    freeze,
    from_cli,
    from_dict,
    load_yaml,
    to_dict,
    validate,
)
from pipeline.config_checks import Range


def refusal(argv: list[str]) -> str:
    with pytest.raises(ConfigError) as error:
        from_cli(argv)
    return str(error.value)


@pytest.mark.parametrize("argv,message", [
    (["--data.crop_size=0"], "data.crop_size=0 is out of range: expected value >= 1"),
    (["--data.crop_size=-5"], "data.crop_size=-5 is out of range: expected value >= 1"),
    (["--data.load_size=0"], "data.load_size=0 is out of range: expected value >= 1"),
    (["--model.g_filters=0"], "model.g_filters=0 is out of range: expected value >= 1"),
    (["--model.d_filters=-1"], "model.d_filters=-1 is out of range: expected value >= 1"),
    (["--model.in_channels=0"], "model.in_channels: 0 is not one of 1, 3"),
    (["--model.out_channels=2"], "model.out_channels: 2 is not one of 1, 3"),
    (["--model.d_layers=-1"], "model.d_layers=-1 is out of range: expected value >= 0"),
    (["--model.d_layers=9"], "model.d_layers: a 9-layer PatchGAN needs images of at least 1536 px "
                             "a side (data.crop_size: 256): lower d_layers"),
    (["--optim.beta1=1.5"], "optim.beta1=1.5 is out of range: expected 0 <= value < 1"),
    (["--optim.beta2=1"], "optim.beta2=1.0 is out of range: expected 0 <= value < 1"),
    (["--optim.lr=nan"], "optim.lr=nan is out of range: expected a finite value > 0"),
    (["--optim.lr=inf"], "optim.lr=inf is out of range: expected a finite value > 0"),
    (["--optim.lr=0"], "optim.lr=0.0 is out of range: expected a finite value > 0"),
    (["--model.init_gain=-5"], "model.init_gain=-5.0 is out of range: expected a finite value > 0"),
    (["--loss.lambda_l1=-100"], "loss.lambda_l1=-100.0 is out of range: expected a finite value >= 0"),
    (["--optim.grad_clip=nan"], "optim.grad_clip=nan is out of range: expected a finite value >= 0"),
    (["--train.ema_decay=1"], "train.ema_decay=1.0 is out of range: expected 0 <= value < 1"),
    (["--train.seed=-1"], "train.seed=-1 is out of range: expected 0 <= value < 140737488355328"),
    (["--train.collective_timeout=0"],
     "train.collective_timeout=0 is out of range: expected 1 <= value <= 1000000000"),
    (["--train.lease_seconds=0.1"], "train.lease_seconds=0.1 is out of range: expected a finite value >= 1"),
    (["--log.every=0"], "log.every=0 is out of range: expected value >= 1"),
    (["--eval.max_images=-1"], "eval.max_images=-1 is out of range: expected value >= 0"),
    (["--data.batch_size=1e3"], "data.batch_size: expected int, got '1e3'"),
])
def test_a_value_out_of_range_is_one_line_naming_key_value_and_range(argv, message):
    assert refusal(argv) == message


def test_every_numeric_field_declares_a_range_that_holds_its_default():
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory()):
            if f.type in ("int", "float"):
                assert isinstance(f.metadata.get("range"), Range), f"{section.name}.{f.name}"
    validate(Config())


def test_nan_and_inf_are_refused_by_every_float_field():
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory()):
            if f.type == "float":
                for bad in ("nan", "inf", "-inf", math.nan):  # as typed, and as YAML's .nan
                    with pytest.raises(ConfigError, match=rf"^{section.name}\.{f.name}=(nan|-?inf) is out"):
                        validate(from_dict({section.name: {f.name: bad}}))


def test_the_range_text_and_membership():
    assert (0.5 in Range.parse("[0, 1)"), 1 in Range.parse("[0, 1)"), math.nan in Range.parse("[0, 1)"))\
        == (True, False, False)
    assert math.inf not in Range.parse("[0, inf)") and math.inf in Range.parse("[0, inf]")
    assert Range.parse("(0, inf)").describe(is_float=True) == "a finite value > 0"
    assert Range.parse("[1, 8]").describe(is_float=False) == "1 <= value <= 8"
    with pytest.raises(ValueError, match="not an interval"):
        Range.parse("0..1")
    help_text = " ".join(build_parser("train.py", "").format_help().split())
    assert "Adam beta1 [0 <= value < 1] (default: 0.5)" in help_text


def yaml_file(tmp_path, text: str | bytes):
    path = tmp_path / "c.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def test_yaml_values_are_read_as_the_command_line_reads_them(tmp_path):
    path = yaml_file(tmp_path, "optim:\n  lr: 2e-4\n  grad_clip: 1E1\nmodel:\n#  norm: instance\n")
    from_file, _ = from_cli(["--config", path])
    from_line, _ = from_cli(["--optim.lr=2e-4", "--optim.grad_clip=1E1"])
    assert from_file == from_line
    assert from_file.optim.lr == 2e-4 and isinstance(from_file.optim.lr, float)
    assert from_file.model == Config().model  # a section with every key commented out: empty
    assert refusal(["--config", yaml_file(tmp_path, "optim: {beta1: .nan}\n")]) == \
        "optim.beta1=nan is out of range: expected 0 <= value < 1"
    assert refusal(["--config", yaml_file(tmp_path, "optim: {lr: fast}\n")]) == \
        "optim.lr: expected float, got 'fast'"


@pytest.mark.parametrize("content,message", [
    (b"model: \xff\xfe\n", "config file {path} is not UTF-8 text (byte 0xff at offset 7)"),
    (b"- model\n- data\n", "config file {path} must be a mapping of sections (model:, data:, ...), "
                           "got a list"),
    (b"just words\n", "config file {path} must be a mapping of sections (model:, data:, ...), got a str"),
    (b"model: 3\n", "config section 'model' must be a mapping of its keys (model.KEY: VALUE), got 3"),
    (b"model: [unclosed\n", "config file {path} is not valid YAML: while parsing a flow sequence"),
    (None, "cannot read config file {path}: Is a directory"),
])
def test_a_bad_config_file_is_one_line_naming_it(tmp_path, content, message):
    if content is None:
        (tmp_path / "c.yaml").mkdir()
        path = str(tmp_path / "c.yaml")
    else:
        path = yaml_file(tmp_path, content)
    with pytest.raises(ConfigError) as error:
        load_yaml(path)
    assert str(error.value) == message.format(path=path)


def test_through_the_entry_point_a_range_error_is_one_line_exit_2_and_writes_nothing(
        tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main = cli.entry_point("train.py", lambda argv: from_cli(argv) and 0)
    assert main(["--optim.beta1=1.5", f"--train.run_dir={tmp_path / 'run'}"]) == 2
    out, err = capsys.readouterr()
    assert err == "train.py: error: optim.beta1=1.5 is out of range: expected 0 <= value < 1\n"
    assert out == "" and list(tmp_path.iterdir()) == []


def test_a_frozen_config_refuses_every_change():
    cfg = freeze(from_cli([])[0])
    for change in (lambda: setattr(cfg.optim, "lr", 1.0), lambda: setattr(cfg, "model", None),
                   lambda: delattr(cfg.data, "crop_size"),
                   lambda: setattr(copy.deepcopy(cfg).train, "seed", 1)):
        with pytest.raises(dataclasses.FrozenInstanceError, match="the config is frozen once start-up"):
            change()
    with pytest.raises(dataclasses.FrozenInstanceError, match="^cannot change optim.lr: "):
        cfg.optim.lr = 1.0
    assert isinstance(cfg.optim.lr, float) and to_dict(cfg) == to_dict(Config()) and cfg == Config()
    unfrozen = dataclasses.replace(cfg.optim, lr=1.0)  # a changed copy is a new, mutable config
    unfrozen.beta1 = 0.0
    assert (unfrozen.lr, unfrozen.beta1, cfg.optim.lr) == (1.0, 0.0, 2e-4)
    Config().optim.lr = 1.0  # only the frozen one


@pytest.mark.parametrize("flag,value,message", [
    ("--resize", "-5", "argument --resize: -5 is out of range: expected value >= 0"),
    ("--load-size", "-5", "argument --load-size: -5 is out of range: expected value >= 0"),
    ("--workers", "0", "argument --workers: 0 is out of range: expected value >= 1"),
    ("--max-samples", "0", "argument --max-samples: 0 is out of range: expected value >= 1"),
    ("--min-shards", "-2", "argument --min-shards: -2 is out of range: expected value >= 1"),
    ("--max-pixels", "0", "argument --max-pixels: 0 is out of range: expected value >= 1"),
    ("--max-bytes", "-5M", "argument --max-bytes: -5242880 is out of range: expected value >= 1"),
    ("--max-bytes", "infM", "argument --max-bytes: not a size: 'INFM'"),
    ("--jpeg-quality", "101", "argument --jpeg-quality: 101 is out of range: expected 0 <= value <= 100"),
    ("--resize", "big", "argument --resize: invalid integer value: 'big'"),
])
def test_shard_numeric_flags_are_range_checked_in_one_line(capsys, flag, value, message):
    with pytest.raises(SystemExit) as done:
        shard.build_parser().parse_args(["pack", "src", "dest", f"{flag}={value}"])
    assert done.value.code == 2
    assert capsys.readouterr().err == f"shard.py pack: error: {message}; see shard.py pack --help\n"
    args = shard.build_parser().parse_args(["pack", "s", "d", "--resize=0", "--jpeg-quality=100"])
    assert (args.resize, args.jpeg_quality, args.workers) == (0, 100, "auto")
