"""S3 credentials from a saved Prefect block, applied to the process that runs a task.

A flow gets only the block's *name*; every task loads the block itself and puts the keys in its
own process environment, where the library's S3 clients read them. So secrets never travel as
task parameters (which Prefect stores and shows) and never reach logs or artifacts.
"""

from __future__ import annotations

import os

_APPLIED: set[str] = set()


def use_credentials(block: str | None) -> str | None:
    """Load `AwsCredentials` or `S3Bucket` block `block` ("<type-slug>/<name>") into os.environ.

    Returns the bucket URL of an S3Bucket block (s3://bucket/folder), else None.
    """
    if not block:
        return None
    from prefect.blocks.core import Block
    from prefect_aws import S3Bucket

    loaded = Block.load(block)
    creds = loaded.credentials if isinstance(loaded, S3Bucket) else loaded
    env = {
        "AWS_ACCESS_KEY_ID": creds.aws_access_key_id,
        "AWS_SECRET_ACCESS_KEY": creds.aws_secret_access_key.get_secret_value()
        if creds.aws_secret_access_key
        else None,
        "AWS_SESSION_TOKEN": creds.aws_session_token,
        "AWS_REGION": creds.region_name,
        "AWS_ENDPOINT_URL_S3": creds.aws_client_parameters.endpoint_url if creds.aws_client_parameters else None,
    }
    for key, value in env.items():
        if value:
            os.environ[key] = str(value)
    if block not in _APPLIED:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()  # clients built before now hold other keys
        _APPLIED.add(block)
    if isinstance(loaded, S3Bucket):
        folder = (loaded.bucket_folder or "").strip("/")
        return f"s3://{loaded.bucket_name}" + (f"/{folder}" if folder else "")
    return None
