"""pipeline/tracking.py without a training run: the one list of choices, the installed
check on packages that truly do not exist, where mlflow is pointed (its light imports, in a
fresh interpreter: tests/integration/test_tracking.py)."""
import os
import typing

import pytest

from pipeline import tracking
from pipeline.config import ConfigError, LogConfig, _field_types, build_parser, from_dict


def test_config_offers_exactly_the_trackers_tracking_knows():
    offered = typing.get_args(_field_types(LogConfig())["tracker"])
    assert set(offered) == {*tracking.PACKAGES, "none"}  # each one tracking can check and start
    assert "--log.tracker {tensorboard,wandb,mlflow,none}" in build_parser("train.py", "").format_help()
    assert from_dict({"log": {"tracker": "mlflow"}}).log.tracker == "mlflow"
    with pytest.raises(ConfigError, match="log.tracker: 'comet_ml' is not one of tensorboard, "
                                          "wandb, mlflow, none"):
        from_dict({"log": {"tracker": "comet_ml"}})


def test_installed_is_false_for_a_module_that_does_not_exist():
    """The real find_spec on a name no environment has: nothing is patched."""
    assert not tracking.installed("p2p_no_such_tracker_module", ("p2p-no-such-tracker",))
    assert tracking.installed("yaml", ("PyYAML",))  # a dependency: the check says yes
    assert tracking.installed("yaml", ("p2p-no-such-tracker", "PyYAML"))  # any of them


def test_a_folder_named_like_the_package_is_not_an_installed_package(tmp_path, monkeypatch):
    """A run folder `wandb/` in the current directory is an importable namespace package:
    find_spec finds it, but accelerate (which also wants metadata) would drop the tracker."""
    (tmp_path / "p2p_fake_tracker").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib.util
    assert importlib.util.find_spec("p2p_fake_tracker") is not None
    assert not tracking.installed("p2p_fake_tracker", ("p2p_fake_tracker",))


def test_require_installed_names_the_key_and_the_fix(monkeypatch):
    """The table entry points at a module that truly does not exist; the check is real."""
    monkeypatch.setitem(tracking.PACKAGES, "wandb", tracking.Package(
        "p2p_no_such_tracker_module", ("p2p-no-such-tracker",), "pip install -e '.[tracking]'"))
    with pytest.raises(ConfigError) as err:
        tracking.require_installed("wandb")
    assert str(err.value) == ("log.tracker: wandb is not installed; pip install -e '.[tracking]' "
                              "(or choose tensorboard/none)")
    tracking.require_installed("none")  # nothing to install
    tracking.require_installed("tensorboard")  # a dependency of the project


def test_mlflow_goes_to_the_run_folder_unless_the_user_chose(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    tracking.mlflow_store(str(tmp_path))
    assert os.environ["MLFLOW_TRACKING_URI"] == f"file:{tmp_path}/mlruns"
    assert os.environ["MLFLOW_ALLOW_FILE_STORE"] == "true"  # mlflow >= 3.7 refuses it else
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    tracking.mlflow_store(str(tmp_path))
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ
