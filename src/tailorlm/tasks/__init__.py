"""Task specifications (read from ``tailorlm/resources/tasks/*.json``) and prompt rendering.

``from tailorlm.tasks import render`` for prompts, ``from tailorlm.tasks import specs`` for the specs. The
submodules are not imported here so that ``tailorlm.data`` and ``tailorlm.tasks`` can import each other's
pieces in either order.
"""
