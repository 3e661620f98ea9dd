"""Thin adapters over the kernel: rtnetlink through pyroute2 (requests, link events and
their BPF filter), inotify, and process settings. They import nothing of the package but
the error tree, so every caller sees ``macvtapdp.errors``, never a library error."""
