"""Ray Serve wiring of loraserve: settings, schemas, router, model servers, metrics, errors.

Import modules directly (``from serve.router import Router``); this package's ``__init__``
stays empty of Ray imports so ``models`` tests never start Ray.
"""
