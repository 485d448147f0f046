"""The runtime: the Backend seam, the one assembler `load_backends`, the denoising step, memory policies."""


def load_backends(*args, **kwargs):
    """See wanrt.runtime.backends.load_backends (imported on use: `import wanrt.runtime` stays light)."""
    from .backends import load_backends as _load_backends

    return _load_backends(*args, **kwargs)
