from setuptools import find_packages, setup

setup(
    name="elmer-fairseq",
    version="0.1.0",
    description="ELMER (non-autoregressive LM with early exit and layer permutation) as a fairseq plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["elmer_fairseq", "elmer_fairseq.*"]),
    install_requires=[
        # provides the `fairseq` package; the 0.12.2 release does not import on Python 3.11
        "fairseq-fixed==0.12.3.1",
        # >= 2.6: torch.load defaults to weights_only=True, which fairseq_compat.py builds on;
        # the Makefile installs 2.13.0 (CPU) only when no torch is present
        "torch>=2.6",
        "numpy",
        "sentencepiece",
        "sacremoses",
        "rouge-score",
        "sacrebleu>=2.0",
        "nltk",
        # --tensorboard-logdir: fairseq writes through torch.utils.tensorboard (needs tensorboard, whose event
        # reader the tests use); tensorboardX silences fairseq's "Please install tensorboardX" at every import
        "tensorboard",
        "tensorboardX",
        # elmer-export / elmer-import: pickle-free model files
        "safetensors",
    ],
    extras_require={
        # fastBPE 0.1.0 builds only from its .pyx: pip install cython && pip install --no-build-isolation fastBPE
        "fastbpe": ["fastBPE==0.1.0"],
        # elmer-convert-hf reads model.safetensors; transformers only to test it
        "convert": ["safetensors"],
        "test": ["pytest", "pytest-xdist", "matplotlib", "safetensors", "transformers>=4.40,<5"],
    },
    entry_points={"console_scripts": [
        "elmer-score = elmer_fairseq.score:main",
        "elmer-export = elmer_fairseq.export:export_main",
        "elmer-import = elmer_fairseq.export:import_main",
        "elmer-init-from-bart = elmer_fairseq.convert_bart:main",
        "elmer-convert-hf = elmer_fairseq.convert_hf:main",
        "elmer-canvas = elmer_fairseq.canvas:main",
        "elmer-exit-layers = elmer_fairseq.generation_io:main",
        "elmer-average-checkpoints = elmer_fairseq.average_checkpoints:main",
    ]},
)
