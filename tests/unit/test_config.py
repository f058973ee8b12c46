"""The typed config: defaults, YAML round trip, CLI overrides and every error path."""

import pytest
import yaml

from pipeline.config import (
    Config,
    ConfigError,
    from_cli,
    from_dict,
    load_yaml,
    to_dict,
    to_yaml,
    validate,
    validate_runtime,
)


def test_defaults_are_the_reference_recipe():
    cfg = Config()
    assert (cfg.optim.lr, cfg.optim.beta1, cfg.optim.beta2) == (2e-4, 0.5, 0.999)
    assert cfg.loss.lambda_l1 == 100.0 and cfg.loss.gan == "vanilla"
    assert (cfg.data.load_size, cfg.data.crop_size, cfg.data.flip) == (286, 256, True)
    assert cfg.model.norm == "batch" and cfg.model.generator == "unet_256"
    assert cfg.model.dropout and cfg.model.init == "normal" and cfg.model.init_gain == 0.02


def test_yaml_round_trip(tmp_path):
    cfg = from_dict({"model": {"generator": "unet_128", "norm": "instance"},
                     "data": {"crop_size": 128, "train": "s3://bucket/shards"},
                     "optim": {"lr": 1e-3}})
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(cfg))
    again = load_yaml(str(path))
    assert again == cfg
    assert to_yaml(again) == path.read_text()
    assert yaml.safe_load(path.read_text())["model"]["generator"] == "unet_128"


def test_cli_overrides_the_file_and_parses_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {generator: unet_128}\ndata: {crop_size: 128, batch_size: 4}\n")
    cfg, _ = from_cli(["--config", str(path), "--data.batch_size=8", "--optim.lr", "2e-4",
                       "--model.dropout=false", "--train.run_dir=1e3"])
    assert cfg.data.batch_size == 8 and cfg.data.crop_size == 128
    assert cfg.optim.lr == 2e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.model.dropout is False
    assert cfg.train.run_dir == "1e3"  # strings stay strings


def test_cli_defaults_do_not_override_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {batch_size: 4}\n")
    cfg, _ = from_cli(["--config", str(path)])
    assert cfg.data.batch_size == 4


@pytest.mark.parametrize("argv,message", [
    (["--data.crop_sise=128"], "unknown config key 'data.crop_sise' (did you mean 'data.crop_size'?)"),
    (["--dat.crop_size=128"], "unknown config key 'dat.crop_size' (did you mean 'data'?)"),
    (["--data.crop_size=big"], "data.crop_size: expected int, got 'big'"),
    (["--model.dropout=3"], "model.dropout: expected bool, got 3"),
    (["--data.batch_size=true"], "data.batch_size: expected int, got True"),
    (["--model.norm=group"], "model.norm: 'group' is not one of batch, instance, none, syncbatch"),
    (["--data.crop_size=200", "--data.load_size=286"],
     "data.crop_size: 200 is not divisible by 256 as model.generator=unet_256 needs"),
    (["--data.load_size=128"], "data.load_size: 128 is smaller than the crop 256x256"),
    (["--optim.lr=0"], "optim.lr=0.0 is out of range: expected a finite value > 0"),
    (["--data.num_workers=-1"], "data.num_workers=-1 is out of range: expected value >= 0"),
    (["--data.train=pipe:curl x"], "data.train: unsupported storage URL 'pipe:curl x': only local paths, "
                                   "file:// and s3:// are accepted (pipe: URLs run a shell and are refused)"),
    (["positional"], "unexpected command-line argument 'positional'"),
])
def test_cli_errors_are_one_line_and_name_the_key(argv, message):
    with pytest.raises(ConfigError) as error:
        from_cli(argv)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_yaml_errors_name_the_key(tmp_path):
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("optim: {learning_rate: 0.1}\n")
    with pytest.raises(ConfigError, match="unknown config key 'optim.learning_rate'"):
        load_yaml(str(unknown))
    not_a_section = tmp_path / "flat.yaml"
    not_a_section.write_text("lr: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key 'lr'"):
        load_yaml(str(not_a_section))
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(str(broken))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_yaml(str(tmp_path / "missing.yaml"))


def test_syncbatch_needs_several_cuda_processes():
    cfg = validate(from_dict({"model": {"norm": "syncbatch"}}))
    with pytest.raises(ConfigError, match="syncbatch needs >= 2 CUDA processes, this run has 2 cpu"):
        validate_runtime(cfg, "cpu", 2)
    with pytest.raises(ConfigError, match="1 cuda"):
        validate_runtime(cfg, "cuda", 1)
    validate_runtime(cfg, "cuda", 2)


def test_to_dict_has_every_section():
    assert set(to_dict(Config())) == {"model", "loss", "data", "optim", "train", "log", "eval"}


def test_help_lists_every_key():
    from pipeline.config import build_parser
    text = build_parser("train.py", "").format_help()
    for section, values in to_dict(Config()).items():
        for key in values:
            assert f"--{section}.{key}" in text


def test_feature_matching_needs_the_multiscale_discriminator():
    with pytest.raises(ConfigError, match="loss.lambda_feat: feature matching compares a multiscale D"):
        from_cli(["--loss.lambda_feat=10"])
    cfg, _ = from_cli(["--loss.lambda_feat=10", "--model.discriminator=multiscale", "--model.num_d=3"])
    assert cfg.model.num_d == 3
    with pytest.raises(ConfigError, match="model.num_d=0 is out of range: expected value >= 1"):
        from_cli(["--model.num_d=0"])
    with pytest.raises(ConfigError, match="model.num_d: 3 scales of a 3-layer PatchGAN need images of "
                                          "at least 96"):
        from_cli(["--model.discriminator=multiscale", "--model.num_d=3", "--model.generator=resnet_6blocks",
                  "--data.crop_size=64",
                  "--data.load_size=64"])


def test_every_shipped_config_loads_and_validates():
    from pathlib import Path
    shipped = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
    assert {p.name for p in shipped} >= {"demo.yaml", "custom.yaml", "facades.yaml", "hd_512.yaml"}
    for path in shipped:
        cfg, _ = from_cli(["--config", str(path), "--data.train=shards", "--data.val=shards"])
        assert cfg.data.crop_size % cfg.model.size_multiple == 0
        if cfg.optim.decay_steps:  # a schedule that ends where the run does
            assert cfg.optim.constant_steps + cfg.optim.decay_steps == cfg.train.max_steps, path.name
