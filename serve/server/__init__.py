"""The server layer: admission, batching and adapter residency for each (base, variant), local
(``local``) or one Ray hop away (``remote``), behind one protocol (``protocol``); ``wiring``
builds them and joins a replica to the adapter registry."""
