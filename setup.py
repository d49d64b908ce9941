"""tfem: temporary files handed between processes through shared memory."""

from setuptools import setup

setup(
    name="tfem",
    version="0.1.0",
    description="Temporary-file exchange in memory for HPC pipelines",
    python_requires=">=3.9",
    packages=["tfem", "tfem.broker", "tfem.registry"],
    package_dir={"tfem": "libtfem", "tfem.broker": "broker", "tfem.registry": "registry"},
    package_data={"tfem": ["tfem_segment.h", "tfem_atomics.h"]},
    setup_requires=["cffi>=1.15"],
    cffi_modules=["libtfem/_build_atomics.py:ffibuilder"],
    install_requires=[
        "cffi>=1.15",
        "posix_ipc>=1.1",
        "sysv_ipc>=1.1",
        "pyzmq>=25",
        "lmdb>=1.4",
        # msgpack frames the broker protocol: compact, fast, typed, and
        # battle-tested; a hand-rolled framing would need its own fuzzing.
        "msgpack>=1.0",
    ],
    extras_require={"test": ["pytest>=7", "hypothesis>=6"]},
    entry_points={"console_scripts": ["tfem=tfem.cli:main"]},
)
