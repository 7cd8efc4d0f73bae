"""PLLaVA (Parameter-free LLaVA extension to videos) on MindSpore: model, weights, video,
tokenizer and generation. This package never imports gRPC; the servers build on it."""

__version__ = "0.1.0"
