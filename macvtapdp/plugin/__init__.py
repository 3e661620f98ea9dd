"""One resource's process (``python -m macvtapdp.plugin``): the kubelet's device plugin API,
the lower link's health, and the macvtaps. It knows nothing of supervisord; the
node side knows nothing of it but its command line (``settings.Serve``)."""
