"""walcar: a write-ahead-log sidecar. Every mutation is journaled to NATS JetStream before it is acked."""

# The one place the version is written: pyproject.toml reads it (dynamic version), the injector's
# default image tag is built from it, and tests/unit/test_version.py checks the Helm chart agrees.
__version__ = "0.1.0"
