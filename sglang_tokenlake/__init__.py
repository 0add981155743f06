"""sglang-tokenlake: one segment-level prefix-cache pool shared by SGLang workers."""

__version__ = "0.1.0"
