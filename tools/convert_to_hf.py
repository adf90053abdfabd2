"""Export a ctxjax run to a Hugging Face directory (Llama; Mistral or Qwen2 when the model needs them).

    python tools/convert_to_hf.py --workdir runs/tiny --out hf/tiny [--step 200] [--dtype float32]

Then, in Python (pip install -e .[hf]):

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("hf/tiny")
    tokenizer = AutoTokenizer.from_pretrained("hf/tiny")
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from ctxjax.convert import hf  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="the ctxjax run (its config.json and checkpoints/)")
    parser.add_argument("--out", required=True, help="the Hugging Face directory to write")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--dtype", default="bfloat16", choices=hf.DTYPES, help="dtype of the saved weights")
    parser.add_argument("--max_shard_size", default="5GB", help="split model.safetensors above this size")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)
    try:
        out = hf.export_hf(args.workdir, args.out, step=args.step, dtype=args.dtype,
                           max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    except (hf.ConversionError, FileExistsError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}: {', '.join(sorted(os.listdir(out)))}")


if __name__ == "__main__":
    main()
