"""magnet_jax: MAGNeT (masked non-autoregressive text-to-music) in JAX/Flax.

Version ranges here admit newer releases (TPU users run Python 3.12+ with jax 0.12+);
`constraints.txt` pins the exact set CI installs on Python 3.11.
"""

from setuptools import find_packages, setup

RUNTIME = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "grain>=0.2.18",
    "array-record>=0.8.6",
    "tensorflow-datasets>=4.9.10",
    "sentencepiece>=0.2.0",
    "transformers>=5.0",  # tokenizers only: transformers 5 has no Flax models
    "protobuf>=5",
    "safetensors>=0.4",
    "huggingface-hub>=0.30",
    "soundfile>=0.13",
    "soxr>=0.5",
    "absl-py>=2.1",
    "ml-collections>=1.0",
    "numpy>=1.26",
    "scipy>=1.12",  # matrix square root of the Fréchet distance (evaluation; jax needs it too)
    "pyyaml>=6.0",
    "tensorboardX>=2.6",
    "tqdm>=4.66",
]

setup(
    name="magnet_jax",
    version="0.1.0",
    description="MAGNeT text-to-music (masked non-autoregressive transformer) in JAX/Flax",
    packages=find_packages(include=["magnet_jax", "magnet_jax.*", "configs", "data_pipelines", "data_pipelines.*"]),
    python_requires=">=3.11",
    install_requires=RUNTIME,
    extras_require={
        # torch only reads PyTorch `.bin` pickles; it is never needed to train or generate.
        "convert": ["torch==2.13.0"],
        "test": [
            "torch==2.13.0",
            "pytest>=8",
            "ruff>=0.15",  # formatter and linter, checked by tests/run.sh
            "matplotlib>=3.8",
            # real dependencies of the audiocraft reference used in parity tests
            "einops>=0.8",
            "omegaconf>=2.3",
            "julius>=0.2.7",
            "num2words>=0.5",
            "flashy>=0.0.2",
            # torchvggish and hear21passt (the FAD / KL embedding references) are installed --no-deps by tests/run.sh
            # real dependencies of the laion_clap reference (CLAP score; laion_clap itself goes in --no-deps)
            "librosa>=0.10",
            "torchlibrosa>=0.1",
        ],
        # ahead-of-time compilation for TPU topologies on a CPU host (matches jax 0.10.2)
        "tpu": ["libtpu==0.0.42.*"],
    },
)
