"""Shared pytest fixtures.

Storage back-ends run for real, never mocked: an S3 API served by moto's
``ThreadedMotoServer`` and a GCS API served by ``gcp-storage-emulator``, both
in-process on 127.0.0.1. The packages are hard requirements of the test suite
(see .ci/storage-deps.txt): when one is missing the fixtures error, they do not
skip.
"""

from __future__ import annotations

import os

# Must be set before gcsfs is imported anywhere: the emulator does not speak the
# hierarchical-namespace / zonal-bucket API that newer gcsfs probes by default.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

import socket  # noqa: E402
import urllib.request  # noqa: E402
import uuid  # noqa: E402

import pytest  # noqa: E402

_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- S3 (moto)


@pytest.fixture(scope="session")
def s3_server():
    """Endpoint URL of a moto S3 server running in a thread for the session."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    mp = pytest.MonkeyPatch()
    for k, v in _S3_ENV.items():
        mp.setenv(k, v)
    # never read the developer's real AWS config or credentials
    mp.setenv("AWS_CONFIG_FILE", os.devnull)
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        mp.undo()


def s3_storage_options(endpoint: str) -> dict:
    return {
        "key": _S3_ENV["AWS_ACCESS_KEY_ID"],
        "secret": _S3_ENV["AWS_SECRET_ACCESS_KEY"],
        "client_kwargs": {"endpoint_url": endpoint, "region_name": _S3_ENV["AWS_DEFAULT_REGION"]},
        # moto is reset between tests: keep no directory listings across them. The
        # filesystem instance itself stays cached, as in real use; a fresh one per
        # call (skip_instance_cache=True) costs ~0.15 s of client set-up each time.
        "use_listings_cache": False,
    }


@pytest.fixture
def s3_client(s3_server):
    """A boto3 S3 client against the moto server (for assertions behind s3fs's back)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_server,
        aws_access_key_id=_S3_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=_S3_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=_S3_ENV["AWS_DEFAULT_REGION"],
    )


@pytest.fixture
def s3_bucket(s3_server, s3_client):
    """("s3://<bucket>", storage_options) on a freshly reset moto server."""
    req = urllib.request.Request(f"{s3_server}/moto-api/reset", method="POST", data=b"")
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 200
    bucket = "dtdr-test"
    s3_client.create_bucket(Bucket=bucket)
    return f"s3://{bucket}", s3_storage_options(s3_server)


# --------------------------------------------------------------------------- GCS (emulator)


@pytest.fixture(scope="session")
def gcs_server():
    """Endpoint URL of an in-memory gcp-storage-emulator running for the session."""
    import logging

    from gcp_storage_emulator.server import create_server

    logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)
    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def gcs_bucket(gcs_server):
    """("gs://<bucket>", storage_options): a new, empty bucket for each test."""
    import gcsfs

    bucket = f"dtdr-{uuid.uuid4().hex[:12]}"
    opts = {"token": "anon", "endpoint_url": gcs_server}
    gcsfs.GCSFileSystem(**opts).mkdir(bucket)
    return f"gs://{bucket}", opts
