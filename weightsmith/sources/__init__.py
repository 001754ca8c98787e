"""Model sources: find the container files of a model, parse their headers, index the tensors.

`open_source(url)` accepts a local file or folder, `s3://bucket/key` or `http(s)://` URL of a
safetensors file, a sharded checkpoint (`model.safetensors.index.json` or its folder) or a
`.gguf` file. It reads headers only; tensor bytes are read later, one range at a time.
"""

from weightsmith.sources.source import Source, open_source

__all__ = ["Source", "open_source"]
