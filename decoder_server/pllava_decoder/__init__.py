"""The PLLaVA decoder server (``pllava-decoder``): the language half of the model behind the
``pllava.v1.Decoder`` service.

- :mod:`.server`: the servicer (messages in and out) and the command line;
- :mod:`.engine_loop`: the thread that owns the device and steps ``pllava.generation.Engine``
  (continuous batching), streaming each request's tokens to its asyncio handler;
- :mod:`.encoder_client`: round-robin calls to the encoder replicas, with retries;
- :mod:`.visual_cache`: visual tokens by video content, LRU, bounded in bytes;
- :mod:`.metrics`: ``DecoderMetrics``, the Prometheus metrics in the server's own registry;
- :mod:`.settings`: ``DecoderSettings`` (defaults < YAML < ``PLLAVA_DECODER_*`` < flags).
"""
