"""mirrorgate proxy: the Open Inference Protocol server, backends, mirror dispatch, CLI."""

__version__ = "0.1.0"
