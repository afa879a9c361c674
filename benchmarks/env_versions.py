"""Print what a benchmark runs on: Python, torch and CUDA, the GPU, and the libraries that matter.

    python benchmarks/env_versions.py
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("transformers", "nvidia-modelopt", "flash-linear-attention", "fla-core", "triton", "prefect",
            "mlflow-skinny", "mlflow")


def main() -> None:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    print(f"python {platform.python_version()} | torch {torch.__version__} (CUDA {torch.version.cuda}) | {gpu}")
    for name in PACKAGES:
        try:
            print(f"{name} {version(name)}")
        except PackageNotFoundError:
            print(f"{name} absent")


if __name__ == "__main__":
    main()
