"""Hugging Face import/export (needs the `hf` extra: transformers, torch, safetensors).

    from ctxjax.convert import export_hf, import_hf
    export_hf("runs/tiny", "hf/tiny")              # -> AutoModelForCausalLM.from_pretrained("hf/tiny")
    import_hf("path/to/hf_model", "runs/base")     # -> --config.checkpoint.init_from=runs/base
"""
from ctxjax.convert.hf import ConversionError, export_hf, import_hf  # noqa: F401
