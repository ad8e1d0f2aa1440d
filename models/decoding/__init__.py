"""The generative backend: a causal LM served with continuous batching across LoRA adapters
(``engine``), its slot KV cache (``kv_cache``), token choice (``sampling``) and streamed text
(``text``), behind the ``Backend`` seam (``backend``). ``models.generative`` builds the default
base this serves."""
