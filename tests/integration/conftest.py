"""S3-protocol fixtures: moto's server mode on loopback (moto.server.ThreadedMotoServer on 127.0.0.1, a
free port), spoken to over HTTP by boto3 exactly as AWS or MinIO would be."""

from __future__ import annotations

import uuid

import boto3
import pytest

CREDENTIALS = dict(aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")


@pytest.fixture(scope="module")
def s3_url():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def client(s3_url):
    return boto3.client("s3", endpoint_url=s3_url, **CREDENTIALS)


@pytest.fixture
def bucket(client):
    name = f"squeeze-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return name
