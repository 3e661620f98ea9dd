"""What tests/ and bench/ share: the kubelet stand-in, network namespaces, frames
through taps, and runners for the real programs. Neither imports the other."""
