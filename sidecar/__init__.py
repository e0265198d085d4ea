"""walcar: a write-ahead-log sidecar. Every mutation is journaled to NATS JetStream before it is acked."""

__version__ = "0.1.0"
