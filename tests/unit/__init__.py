"""Unit layer: the package's pieces in this process, no Ray, no subprocess clusters, no MLflow
server (MLflow on a sqlite file is fine); lint and mypy. `make test-fast`."""
