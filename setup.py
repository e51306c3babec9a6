from setuptools import find_packages, setup

setup(
    name="megatron_mellama",
    version="0.1.0",
    description="Megatron-style 3D-parallel continual pretraining of LLaMA2 (Me-LLaMA)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_mellama", "megatron_mellama.*"]),
    install_requires=[
        # 2.10 is the first release with the pipelining schedules' step(return_outputs=...) and
        # replicate_with_fsdp on a 1-D mesh; a range the local CPU build 2.13.0 satisfies, so
        # nothing pulls a CUDA build over it
        "torch>=2.10,<3",
        "numpy",
        "pyyaml",
        "sentencepiece>=0.2",
        "safetensors",
        "tqdm",
        # megatron-core's datasets: the .bin/.idx format, GPTDataset, blending, compiled helpers
        "megatron-core>=0.16,<0.17",
        "nltk",
        "tensorboard",
        "packaging",
        # the images of mellama-plot-run and mellama-compare-runs (Agg, no display needed)
        "matplotlib",
    ],
    extras_require={
        # Triton runs the kernel tests on the CPU through its interpreter (CUDA builds of torch
        # already bring it)
        "test": ["pytest>=7", "transformers>=4.45", "tokenizers", "triton>=3.0; platform_system == 'Linux'",
                 # the suite's workers (python -m pytest -n 2 --dist loadfile)
                 "pytest-xdist>=3",
                 # the reference the evaluation's scoring is held to (tests/test_evaluation_vs_lm_eval.py)
                 "lm-eval[hf]>=0.4.13",
                 # W&B's offline run files (tests/test_wandb.py)
                 "wandb"],
        "te": ["transformer_engine[pytorch]"],
        # --wandb-project
        "wandb": ["wandb"],
        # --tokenizer-backend gigatoken: pinned, as its SentencePiece converter is a private module;
        # orjson parses the JSONL lines
        "fast": ["gigatoken==0.10.0", "orjson>=3.9"],
    },
    entry_points={
        "console_scripts": [
            "mellama-pretrain=megatron_mellama.pretrain:main",
            "mellama-preprocess-data=megatron_mellama.tools.preprocess_data:main",
            "mellama-preprocess-sft=megatron_mellama.tools.preprocess_sft:main",
            "mellama-merge-datasets=megatron_mellama.tools.merge_datasets:main",
            "mellama-inspect-dataset=megatron_mellama.tools.inspect_dataset:main",
            "mellama-hf-to-mellama=megatron_mellama.tools.hf_to_mellama:main",
            "mellama-to-hf=megatron_mellama.tools.mellama_to_hf:main",
            "mellama-megatron-to-mellama=megatron_mellama.tools.megatron_to_mellama:main",
            "mellama-to-megatron=megatron_mellama.tools.mellama_to_megatron:main",
            "mellama-plan-layout=megatron_mellama.tools.plan_layout:main",
            "mellama-verify-checkpoint=megatron_mellama.tools.verify_checkpoint:main",
            "mellama-evaluate=megatron_mellama.tools.evaluate:main",
            "mellama-compare-runs=megatron_mellama.tools.compare_runs:main",
            "mellama-plot-run=megatron_mellama.tools.plot_run:main",
        ],
    },
)
