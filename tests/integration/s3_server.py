"""A real S3 endpoint on 127.0.0.1 for the tests: moto's S3 server in a thread of the test
process, on a free port, with IAM authentication on (a request must be signed with the
test user's key and secret, so a credential that does not reach a process fails there)
and faults injected in front of it on request: an error answer for the next N requests
that match, a delay, or a bucket that vanishes."""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field

REGION = "us-east-1"


@dataclass
class Fault:
    """The next ``times`` requests of ``method`` whose path matches ``path`` get ``status``
    with the S3 error ``code`` (or, with ``delay_s``, wait that long and go through; with
    ``action``, run it first and go through). ``copy``: only copies (a PUT with
    ``x-amz-copy-source``); ``copy=False``: only requests that are not copies."""

    method: str
    path: re.Pattern
    times: int
    status: int = 500
    code: str = "InternalError"
    delay_s: float = 0.0
    copy: bool | None = None
    action: object = None
    fired: int = 0
    paths: list[str] = field(default_factory=list)

    def matches(self, method: str, path: str, is_copy: bool) -> bool:
        if self.fired >= self.times or method != self.method or not self.path.search(path):
            return False
        return self.copy is None or self.copy == is_copy


class S3Server:
    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        self.app = DomainDispatcherApplication(create_backend_app)
        self.faults: list[Fault] = []
        self.lock = threading.Lock()
        self.server = make_server(
            "127.0.0.1", 0, self._wsgi, threaded=True, request_handler=MotoRequestHandler
        )
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.key, self.secret = self._user()

    # ------------------------------------------------------------------ set-up

    def _user(self) -> tuple[str, str]:
        """An IAM user allowed everything on S3; then every request must be signed by it."""
        import boto3
        from moto import settings
        from moto.core.responses import ActionAuthenticatorMixin

        iam = boto3.client(
            "iam",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )
        iam.create_user(UserName="batchjobs-test")
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(
            UserName="batchjobs-test", PolicyName="s3", PolicyDocument=json.dumps(policy)
        )
        key = iam.create_access_key(UserName="batchjobs-test")["AccessKey"]
        self._auth_was = settings.INITIAL_NO_AUTH_ACTION_COUNT
        settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
        ActionAuthenticatorMixin.request_count = 0
        return key["AccessKeyId"], key["SecretAccessKey"]

    def stop(self) -> None:
        from moto import settings

        self.server.shutdown()
        self.thread.join(timeout=10)
        settings.INITIAL_NO_AUTH_ACTION_COUNT = self._auth_was

    def options(self) -> dict:
        """s3fs storage options that reach this server as the test user."""
        return {
            "key": self.key,
            "secret": self.secret,
            "client_kwargs": {"endpoint_url": self.url, "region_name": REGION},
        }

    def env(self) -> dict[str, str]:
        """The same as environment variables (botocore reads AWS_ENDPOINT_URL too)."""
        return {
            "AWS_ACCESS_KEY_ID": self.key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_ENDPOINT_URL": self.url,
            "AWS_DEFAULT_REGION": REGION,
        }

    def fs(self):
        """A fresh s3fs filesystem of the test user (no cached listings)."""
        import s3fs

        return s3fs.S3FileSystem(
            skip_instance_cache=True, use_listings_cache=False, **self.options()
        )

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=self.key,
            aws_secret_access_key=self.secret,
        )

    def bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def vanish(self, bucket: str) -> None:
        """Delete a bucket and everything in it, as an operator (or a lifecycle bug) would;
        writers racing the deletion are outrun by trying again."""
        s3 = self.client()
        for _ in range(50):
            keys = [
                {"Key": o["Key"]}
                for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
                for o in page.get("Contents", [])
            ]
            for i in range(0, len(keys), 1000):
                s3.delete_objects(Bucket=bucket, Delete={"Objects": keys[i : i + 1000]})
            try:
                s3.delete_bucket(Bucket=bucket)
                return
            except s3.exceptions.ClientError as exc:
                if "BucketNotEmpty" not in str(exc):
                    raise
        raise AssertionError(f"bucket {bucket} kept filling up")

    # ------------------------------------------------------------------ faults

    def inject(self, fault: Fault) -> Fault:
        with self.lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self.lock:
            self.faults.clear()

    def _wsgi(self, environ, start_response):
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO", "")
        is_copy = "HTTP_X_AMZ_COPY_SOURCE" in environ
        with self.lock:
            fault = next((f for f in self.faults if f.matches(method, path, is_copy)), None)
            if fault is not None:
                fault.fired += 1
                fault.paths.append(path)
        if fault is None:
            return self.app(environ, start_response)
        if fault.action is not None:
            fault.action()
            return self.app(environ, start_response)
        if fault.delay_s:
            time.sleep(fault.delay_s)
            return self.app(environ, start_response)
        _drain(environ)
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{fault.code}</Code><Message>injected by the test</Message>"
            "<RequestId>test</RequestId></Error>"
        ).encode()
        start_response(
            f"{fault.status} Injected",
            [
                ("Content-Type", "application/xml"),
                ("Content-Length", str(len(body))),
                ("Connection", "close"),
            ],
        )
        return [body]


def _drain(environ) -> None:
    """Read the request's body, so that the client gets the answer and not a reset."""
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH")
    if length:
        stream.read(int(length))
    elif environ.get("wsgi.input_terminated"):
        stream.read()
