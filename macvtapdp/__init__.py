"""macvtapdp: a Kubernetes device plugin that hands pods macvtap tap devices."""

__version__ = "0.1.0"
