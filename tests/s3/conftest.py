"""The s3 tier: a real S3-protocol server (moto's) on 127.0.0.1, reached through the environment.

The server runs as a subprocess on a free loopback port and is stopped by its own PID. pyarrow
and fsspec find it through ``AWS_ENDPOINT_URL`` and dummy credentials, set for the driver and,
through ``spark.executorEnv.*``, for Spark's Python workers; sparkdl itself gets no test hook.
Spark's own S3A jars are not in the pip pyspark, so datasets stay on local disk here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from sparkdl.testing import LOOPBACK, free_port, wait_for_port

BUCKET = "sparkdl-tests"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """(endpoint, environment) of a moto S3 server with the bucket ``BUCKET``; the driver's
    environment points at it while the session lasts."""
    port = free_port()
    endpoint = f"http://{LOOPBACK}:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    log = open(log_path, "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        wait_for_port(port, timeout_s=60, process=proc, log=str(log_path))
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint, env
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def s3_module_root(s3_server):
    """A fresh ``s3://`` prefix for one test module."""
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def s3_root(s3_server):
    """A fresh ``s3://`` prefix for one test."""
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def spark_s3(s3_server):
    """A ``local[2]`` session whose Python workers see the S3 server's environment."""
    from pyspark.sql import SparkSession

    from sparkdl.testing import local_spark_session

    active = SparkSession.getActiveSession()
    if active is not None:
        active.stop()  # executor environment is fixed when a context starts
    conf = {f"spark.executorEnv.{key}": value for key, value in s3_server[1].items()}
    return local_spark_session("local[2]", app_name="sparkdl-tests-s3", conf=conf, ui=False)
