"""Import a Hugging Face Llama, Mistral or Qwen2-family model as a ctxjax workdir.

    python tools/convert_from_hf.py path/to/hf_model --workdir runs/base [--base_config configs/x.py]

The workdir holds config.json, config.py, the tokenizer files and the params at step 0. Continue
training from it (a new workdir; the imported one has no optimizer state):

    python -m ctxjax.train --config=runs/base/config.py --workdir=runs/next
    python -m ctxjax.train --config=configs/extend_yarn_64k.py --workdir=runs/yarn64k \\
        --config.checkpoint.init_from=runs/base
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from ctxjax.convert import hf  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir", help="a Hugging Face model directory (config.json + *.safetensors)")
    parser.add_argument("--workdir", required=True, help="the ctxjax workdir to write")
    parser.add_argument("--base_config", default=None,
                        help="config file whose non-model sections to use (default: ctxjax.config defaults)")
    parser.add_argument("--overwrite", action="store_true", help="replace --workdir if it exists")
    args = parser.parse_args(argv)
    try:
        out = hf.import_hf(args.hf_dir, args.workdir, base_config=args.base_config, overwrite=args.overwrite)
    except (hf.ConversionError, FileExistsError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}\ntrain from it: python -m ctxjax.train --config={out}/config.py --workdir=runs/next")


if __name__ == "__main__":
    main()
