"""ctxjax: pretraining and extending long-context language models in JAX."""

__version__ = "0.1.0"


def load_model(workdir, step=None):
    """(model, config) from a training workdir; `model(tokens)` returns logits."""
    from ctxjax.checkpoint import load_model as _load_model
    return _load_model(workdir, step=step)
