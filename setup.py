"""ctxjax: pretraining and extending long-context language models in JAX."""
from setuptools import find_packages, setup

setup(
    name="ctxjax",
    version="0.1.0",
    description="Long-context LM pretraining and extension in JAX: SkyLadder, document masks, "
    "RoPE extension, context parallelism, Pallas attention kernels.",
    packages=find_packages(include=["ctxjax", "ctxjax.*", "pallas_kernels", "pallas_kernels.*", "configs"]),
    license="MIT",
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2,<0.12",  # tested on 0.10.2 (Python 3.11) and 0.11.x (Python 3.12)
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",
        "grain",
        "array-record",
        "tensorstore",
        "ml-collections",
        "numpy",
        "tokenizers",
        "sentencepiece",
        "pyarrow",
        "tqdm",
        "tensorboardX",
        "tensorboard",  # to read the runs' logs: tensorboard --logdir WORKDIR/tensorboard
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "pytest-timeout"],
        "hf": ["transformers>=5", "torch", "safetensors"],
        "wandb": ["wandb"],
        # libtpu, at the version the installed jax pins (jax[tpu]'s own pin): on a TPU VM to
        # train, on any host to compile for TPU topologies (python -m ctxjax.aot)
        "tpu": ["jax[tpu]>=0.10.2,<0.12"],
    },
)
