"""mesh-agent: brings a VM into an Istio service mesh and keeps it there."""

__version__ = "0.1.0"
