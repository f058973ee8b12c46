"""The run folder's layout: every name a training run writes into `train.run_dir`, in one
place (the checkpoint folders' own files are pipeline/checkpoint.py's).

    RUN/config.yaml              the resolved config of the latest start
    RUN/metrics.jsonl            validation metrics, a row per evaluated step
    RUN/train_log.jsonl          a row per logged step
    RUN/checkpoints/             step_N/ folders (each with trainer.json) and their latest
                                 / best markers
    RUN/samples/step_N.png       sample grids
    RUN/keys/rank{R}.jsonl       the sample keys of every step (data.record_keys)
    RUN/logs/                    TensorBoard's files (accelerate's "logs" tracker folder)
    RUN/lease.json, lease.lock   the folder's one writer (pipeline/lease.py)
"""
from __future__ import annotations

import os

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
TRAIN_LOG = "train_log.jsonl"
CHECKPOINTS = "checkpoints"
SAMPLES = "samples"
KEYS = "keys"
LOGS = "logs"
LEASE, LEASE_LOCK = "lease.json", "lease.lock"
TRAINER = "trainer.json"  # in each checkpoint folder: its step, world size, config, precision


def step_name(step: int) -> str:
    """`step_00001200`: a checkpoint's folder and a sample grid's name."""
    return f"step_{step:08d}"


def config(run_dir: str) -> str:
    return os.path.join(run_dir, CONFIG)


def metrics(run_dir: str) -> str:
    return os.path.join(run_dir, METRICS)


def train_log(run_dir: str) -> str:
    return os.path.join(run_dir, TRAIN_LOG)


def checkpoints(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINTS)


def sample_grid(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, SAMPLES, f"{step_name(step)}.png")


def keys(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, KEYS, f"rank{rank}.jsonl")
