"""The node side: ``macvtapdp run`` and the supervisord it becomes, with its helpers.

Rendering the config (``render``, ``programs``), starting (``run``), keeping
the resource programs in line with the configuration or the links
(``wanted``, ``apply``, ``reconcile``, ``discovery``), restarting FATAL
programs (``watchdog``), and answering questions (``control``, ``status``,
``metrics``). It knows nothing of the resource processes but their command
line (``settings.Serve``), their state files and their sockets.
"""
