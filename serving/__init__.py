"""raylm: serving, in three layers.

- ``serving.engine``: the pure inference engine (tokens in, tokens out; continuous batching, no Ray),
  with ``serving.sampling`` and ``serving.detok``; ``serving.backend`` is the interface it implements
  (``serving.vllm_backend``: the same interface over vLLM, chosen by ``serve.engine.backend``).
- ``serving.openai_api`` (+ ``serving.protocol``): the OpenAI-compatible FastAPI layer.
- ``serving.deployment``: the Ray Serve deployment, app builders and ``raylm serve``.

``serving.config`` holds the ``serve`` config section. Import the layer you need; this package face
stays import-light (no torch, no Ray).
"""

__all__: list[str] = []
