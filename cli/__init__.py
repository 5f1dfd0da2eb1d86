"""The ``ragline`` command: the application around the ``ragline`` library and the services.

It runs the stack (``launcher``), ingests documents (``ingest``), runs one service, and holds
the build tools (``protogen``); ``python -m cli`` is the command without installing it.
"""
