"""Build selflabel and its C++ extension selflabel._C from csrc/.

CPU sources are always built (OpenMP, -O3). Set SELFLABEL_PORTABLE=1 to build
without -march=native (for wheels that move between machines).
"""

import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-std=c++17"]
if os.environ.get("SELFLABEL_PORTABLE", "0") != "1":
    cxx_flags.append("-march=native")

setup(
    name="selflabel",
    version="0.1.0",
    description="Fast Sinkhorn-Knopp self-labelling (SeLa) for clustering-based self-supervised learning",
    packages=["selflabel", "selflabel.backends", "selflabel.compat", "selflabel.kernels", "selflabel.train"],
    package_dir={"selflabel.kernels": "kernels"},
    ext_modules=[
        CppExtension(
            name="selflabel._C",
            sources=["csrc/sinkhorn.cpp"],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={"train": ["scikit-learn", "scipy", "tensorboard"]},
    entry_points={"console_scripts": ["selflabel=selflabel.cli:main"]},
)
