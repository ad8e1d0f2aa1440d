"""Ray Serve wiring of loraserve, in layers that import only downward (import-linter checks):
``cli`` -> ``launcher`` -> ``app`` -> ``ingress`` (HTTP routes) -> ``server`` (admission,
batching, adapter residency) -> ``registry`` -> ``metrics``, ``errors``, ``settings`` -> the
Ray-free engine in ``models``.

Import modules directly (``from serve.ingress.app import Router``); this package's ``__init__``
stays empty so ``models`` tests never import Ray.
"""
