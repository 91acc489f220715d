from setuptools import setup

# `kernels/` ships as `mmpl_fast.kernels`: a top-level `kernels` package would clash with another PyPI project.
setup(
    name="mmpl_fast",
    version="0.1.0",
    description="Macro-from-Micro Planning for long video generation with Triton kernels (Wan2.1 family)",
    python_requires=">=3.10",
    packages=["mmpl_fast", "mmpl_fast.kernels", "mmpl_fast.scheduler", "mmpl_fast.world"],
    package_dir={"mmpl_fast": "mmpl_fast", "mmpl_fast.kernels": "kernels"},
    package_data={"mmpl_fast": ["assets/embedded/*.json", "assets/embedded/*/*"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
        "safetensors>=0.4",
        "diffusers>=0.35",
        "transformers>=4.56",  # from_pretrained(dtype=...)
        "einops",
        "imageio",
        "imageio-ffmpeg",
        "tqdm",
        "nvidia-ml-py",
        "matplotlib",
        "scipy",
    ],
    extras_require={
        "gpu": ["flash-attn", "xformers"],
        "dev": ["pytest", "pytest-benchmark", "ruff"],
    },
)
