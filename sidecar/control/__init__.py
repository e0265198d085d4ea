"""The control plane in NATS: namespaces defined and changed live (docs/control-plane.md)."""
