"""The local stack without Docker: SeaweedFS (`seaweed`), Prefect server and workers (`stack`),
and the process-group helper both use (`processes`)."""
