"""Test-wide settings: the fixture modules in tests/helpers/, loaded as plugins, and the one
rule for a missing real component.

With CI=true a test whose real component (S3 server, Slurm, DeepSpeed) is missing must
fail, not skip: `require_component` is the one place that decides.
"""
import os

import pytest

ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_component(available: bool, what: str) -> None:
    """Skip locally, fail on CI, when a real component the test needs is missing."""
    if available:
        return
    if ON_CI:
        pytest.fail(f"{what} is required on CI (CI=true) but is not available")
    pytest.skip(f"{what} not available")

pytest_plugins = [
    "tests.helpers.s3_servers",  # moto_s3 and seaweed_s3 fixtures
    "tests.helpers.fault_proxy",  # fault_proxy: a flaky HTTP proxy in front of a test S3 server
    "tests.helpers.trainer_runs",  # demo_shards
    "tests.helpers.inference_runs",  # trained_run
    "tests.helpers.substitute_weights",  # substitute_weights: FID/KID/LPIPS weights in a tmp folder
    "tests.helpers.slurm_cluster",  # slurm_cluster: munged, slurmctld, 2 x slurmd on 127.0.0.1
]
