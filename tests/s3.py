"""A real S3 API server for tests: moto's standalone server on 127.0.0.1, in this process, with AWS
signatures checked against one IAM user (so wrong credentials are refused as on AWS). Stopping it
and starting it again on the same port keeps the buckets, as a store that was down for a while."""
from __future__ import annotations

import json
import os
from pathlib import Path

from deploy.server import free_port

REGION = "us-east-1"
ALLOW_S3 = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}


class S3Server:
    """`with S3Server() as s3:` a server with a user allowed everything in S3; `s3.env` names it to
    the standard AWS variables (the user's keys, AWS_ENDPOINT_URL, AWS_REGION)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server = None
        self.env: dict[str, str] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "S3Server":
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def client(self, env: dict[str, str] | None = None):
        """A boto3 S3 client with these credentials (default: the allowed user's)."""
        import boto3

        env = env or self.env
        return boto3.client("s3", endpoint_url=self.url, region_name=REGION,
                            aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])

    def __enter__(self) -> "S3Server":
        import boto3
        import moto.settings

        self.start()
        self.no_auth_before = moto.settings.INITIAL_NO_AUTH_ACTION_COUNT
        iam = boto3.client("iam", endpoint_url=self.url, region_name=REGION, aws_access_key_id="setup",
                           aws_secret_access_key="setup")
        iam.create_user(UserName="lab")
        iam.put_user_policy(UserName="lab", PolicyName="s3", PolicyDocument=json.dumps(ALLOW_S3))
        key = iam.create_access_key(UserName="lab")["AccessKey"]
        moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # from now on every request is checked
        # AWS_MAX_ATTEMPTS: a store on loopback that stops answering is given up on in a second or two, not 20 s.
        self.env = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
                    "AWS_ENDPOINT_URL": self.url, "AWS_REGION": REGION, "AWS_MAX_ATTEMPTS": "2"}
        return self

    def __exit__(self, *_: object) -> None:
        import moto.settings

        self.stop()
        moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = self.no_auth_before

    def upload(self, bucket: str, folder: Path, prefix: str) -> list[str]:
        """Every file of `folder` under `prefix`; their s3:// URIs."""
        client = self.client()
        uris = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            key = f"{prefix}/{path.relative_to(folder)}"
            client.upload_file(str(path), bucket, key)
            uris.append(f"s3://{bucket}/{key}")
        return uris

    def download(self, bucket: str, prefix: str, folder: Path) -> Path:
        """Every object under `prefix` into `folder`, by its path below the prefix."""
        client = self.client()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
            for item in page.get("Contents", []):
                target = folder / item["Key"][len(prefix) + 1 :]
                target.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, item["Key"], str(target))
        return folder

    def keys(self, bucket: str, prefix: str) -> list[str]:
        client = self.client()
        return [item["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                for item in page.get("Contents", [])]


def aws_env(s3: S3Server, **changes: str) -> dict[str, str]:
    """This process's environment with the server's AWS variables (and `changes`) for a child process."""
    return {**os.environ, **s3.env, **changes}
