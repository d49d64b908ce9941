"""tfem: temporary files handed between processes through shared memory.

Besides the Python packages, the build makes two native pieces:
- tfem._native, a cffi API-mode extension (cffi_modules);
- libtfem.so, the C API, a cffi embedding-mode library. cffi_modules cannot
  build it (it would produce a module without a link to libpython, which C
  programs cannot link against), so build_ext compiles it with
  FFI.compile() and installs it with tfem.h and a pkg-config file inside
  the package: tfem/lib/, tfem/include/, tfem/lib/pkgconfig/.
"""

import os
import shutil
import sys
import tempfile

from setuptools import setup
from setuptools.command.build_ext import build_ext

PKG_CONFIG = """prefix=${pcfiledir}/../..
libdir=${prefix}/lib
includedir=${prefix}/include

Name: tfem
Description: Temporary-file exchange in memory, C API
Version: %s
Libs: -L${libdir} -Wl,-rpath,${libdir} -ltfem
Cflags: -I${includedir}
"""
VERSION = "0.1.0"
# 2025.1: pipe_file's mode, which fsspec's reusable tests ask for
FSSPEC = ["fsspec>=2025.1.0"]
DASK = [*FSSPEC, "pandas>=2", "pyarrow>=14", "dask[dataframe]>=2025.1.0", "distributed>=2025.1.0"]


class BuildWithCShim(build_ext):
    def run(self):
        super().run()
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "libtfem"))
        try:
            from _build_shim import make_builder
        finally:
            sys.path.pop(0)
        package_dir = "libtfem" if self.inplace else os.path.join(self.build_lib, "tfem")
        lib_dir = os.path.join(package_dir, "lib")
        os.makedirs(os.path.join(lib_dir, "pkgconfig"), exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            built = make_builder(sys.executable).compile(tmpdir=tmp, target="libtfem.so")
            shutil.copy(built, os.path.join(lib_dir, "libtfem.so"))
        if not self.inplace:
            shutil.copytree("libtfem/include", os.path.join(package_dir, "include"), dirs_exist_ok=True)
        with open(os.path.join(lib_dir, "pkgconfig", "tfem.pc"), "w") as f:
            f.write(PKG_CONFIG % VERSION)


setup(
    name="tfem",
    version=VERSION,
    description="Temporary-file exchange in memory for HPC pipelines",
    python_requires=">=3.9",
    packages=["tfem", "tfem.broker", "tfem.registry"],
    package_dir={"tfem": "libtfem", "tfem.broker": "broker", "tfem.registry": "registry"},
    package_data={"tfem": ["include/tfem.h"]},
    setup_requires=["cffi>=1.15"],
    cffi_modules=["libtfem/native/build.py:ffibuilder"],
    cmdclass={"build_ext": BuildWithCShim},
    install_requires=[
        "cffi>=1.15",
        "posix_ipc>=1.1",
        "sysv_ipc>=1.1",
        "pyzmq>=25",
        "lmdb>=1.4",
        # msgpack frames the broker protocol: compact, fast, typed, and
        # battle-tested; a hand-rolled framing would need its own fuzzing.
        "msgpack>=1.0",
        # crc32c: file checksums at memory speed (SSE4.2/ARMv8 CRC
        # instructions, ~10 GB/s here against zlib.crc32's 2.8).
        "crc32c>=2.3",
        # --spill-compress: per-record codecs for the spill store. Both are
        # bindings to the reference C libraries, which a client needs to read
        # a compressed record back, so they are not optional.
        "lz4>=4",
        "zstandard>=0.22",
        # tfem put/get progress bars on a terminal: rate, ETA, terminal width
        # and redraws done right, pure Python; imported only for a bar.
        "tqdm>=4.60",
    ],
    extras_require={
        # matplotlib: the test of the benchmark harness draws its plots;
        # numpy: the zero-copy tests use views from numpy, as users will;
        # mypy (and cffi's stubs): tests/test_types.py type-checks the package;
        # fsspec and the rest of the dask extra: tests/test_fsspec.py runs
        # fsspec's own test suite, pandas, pyarrow and Dask against tfem://;
        # prometheus_client: its parser reads `tfem status --prometheus` (test_cli.py)
        "test": ["pytest>=7", "hypothesis>=6", "matplotlib>=3.5", "numpy>=1.22", "mypy>=1.10", "types-cffi",
                 "prometheus_client>=0.16", *DASK],
        # tfem:// for fsspec (and so for pandas and pyarrow through it)
        "fsspec": FSSPEC,
        # examples/dask_dcr.py: Dask dataframes on a local cluster, parquet
        "dask": DASK,
        # python -m bench (also needs redis-server on PATH)
        "bench": ["redis>=4.2", "matplotlib>=3.5"],
    },
    entry_points={
        "console_scripts": ["tfem=tfem.cli:main"],
        # the protocol tfem:// for fsspec, pandas, pyarrow and Dask, known
        # in every process (Dask's spawned workers too) without an import
        "fsspec.specs": ["tfem=tfem.fsspec_fs:TfemFileSystem"],
    },
    zip_safe=False,
)
