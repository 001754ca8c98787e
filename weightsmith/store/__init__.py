"""The artifact store: one code path on fsspec for file:// and s3://, plus the key encoding."""

from weightsmith.store.keys import decode_key, encode_key
from weightsmith.store.store import Store

__all__ = ["Store", "decode_key", "encode_key"]
