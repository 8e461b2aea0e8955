"""Users of one module store: their lifecycle (``service``: add, import, train, roll back, forget) and
their API keys (``keys``). The command line and the server both call these; neither holds user logic of
its own."""
