"""cffi embedding-mode build of libtfem.so: the C API of include/tfem.h.

The public functions are plain C over the native core (native/
tfem_capi.c, compiled with the core's sources into the library): a C
program whose files fit in memory never starts an interpreter. The calls
that need the broker or the spill store (native/tfem_embed.h: room in a
full arena, spilled bytes and their checksum) go to the embedded Python
runtime, started on first use. Starting it ourselves,
rather than leaving it to cffi, lets us:
- name the interpreter this library was built for (program_name), so
  sys.prefix is the virtual environment it was installed into whatever
  PATH says; TFEM_PYTHON names another;
- notice a failed start and return -1/ENOSYS instead of cffi's silent 0;
- refuse a host that already runs a different Python version;
- take the GIL around fork() (pthread_atfork), so a fork while another
  thread is inside Python does not deadlock the child.
"""

from __future__ import annotations

import pathlib
import re
import sys
import sysconfig

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
NATIVE = HERE / "native"
SOURCES = ("tfem_capi.c", "tfem_file.c", "tfem_table.c", "tfem_geometry.c", "tfem_atomics.c", "tfem_crc32c.c")


def embedded_api() -> str:
    """The `_tfem_py_*` declarations of tfem_embed.h, as cffi takes them."""
    text = re.sub(r"/\*.*?\*/", "", (NATIVE / "tfem_embed.h").read_text(), flags=re.S)
    return "\n".join(line for line in text.splitlines() if line.startswith(("int", "int64_t")) and "_tfem_py_" in line)


PYTHON_START = r"""
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "tfem_embed.h"

static pthread_once_t tfem_once = PTHREAD_ONCE_INIT;
static int tfem_started; /* 1: serving; -1: could not start */
static PyGILState_STATE tfem_fork_gil;

static void tfem_before_fork(void) { tfem_fork_gil = PyGILState_Ensure(); }
static void tfem_after_fork_parent(void) { PyGILState_Release(tfem_fork_gil); }
static void tfem_after_fork_child(void) {
    PyOS_AfterFork_Child();
    PyGILState_Release(tfem_fork_gil);
}

static void tfem_start(void) {
    if (!Py_IsInitialized()) {
        const char *python = getenv("TFEM_PYTHON");
        PyConfig config;
        PyConfig_InitPythonConfig(&config);
        config.install_signal_handlers = 0;
        config.parse_argv = 0;
        PyStatus status = PyConfig_SetBytesString(&config, &config.program_name,
                                                  python ? python : TFEM_BUILD_PYTHON);
        if (!PyStatus_Exception(status)) status = Py_InitializeFromConfig(&config);
        PyConfig_Clear(&config);
        if (PyStatus_Exception(status)) {
            fprintf(stderr, "libtfem: cannot start Python %s: %s\n",
                    python ? python : TFEM_BUILD_PYTHON, status.err_msg ? status.err_msg : "");
            tfem_started = -1;
            return;
        }
        PyEval_SaveThread(); /* let any thread take the GIL */
    } else {
        char want[16];
        snprintf(want, sizeof want, "%d.%d.", PY_MAJOR_VERSION, PY_MINOR_VERSION);
        if (strncmp(Py_GetVersion(), want, strlen(want)) != 0) {
            fprintf(stderr, "libtfem: built for Python %d.%d, but this process runs Python %.8s\n",
                    PY_MAJOR_VERSION, PY_MINOR_VERSION, Py_GetVersion());
            tfem_started = -1;
            return;
        }
    }
    if (_tfem_py_ping() != 1) { /* cffi returns 0 when its init code failed */
        fprintf(stderr, "libtfem: the tfem Python package could not be loaded (traceback above)\n");
        tfem_started = -1;
        return;
    }
    pthread_atfork(tfem_before_fork, tfem_after_fork_parent, tfem_after_fork_child);
    tfem_started = 1;
}

int tfem_python_ready(void) {
    pthread_once(&tfem_once, tfem_start);
    if (tfem_started != 1) {
        errno = ENOSYS;
        return -1;
    }
    return 0;
}
"""

INIT_CODE = """
from _tfem_shim import ffi
import tfem.c_api
tfem.c_api.install(ffi)
"""


def make_builder(python: str = sys.executable) -> FFI:
    """The builder for libtfem.so, starting `python`'s environment."""
    sys.path.insert(0, str(NATIVE))
    try:
        import build as native_build  # writes tfem_states.h
    finally:
        sys.path.pop(0)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    builder = FFI()
    builder.embedding_api(embedded_api())
    builder.set_source(
        "_tfem_shim",
        PYTHON_START,
        sources=[str(NATIVE / source) for source in SOURCES],
        include_dirs=[str(HERE / "include"), str(NATIVE)],
        define_macros=[("TFEM_BUILD_PYTHON", '"%s"' % python.replace('"', '\\"'))],
        extra_compile_args=native_build.COMPILE_ARGS,
        extra_link_args=[f"-Wl,-rpath,{libdir}"] if libdir else [],
        library_dirs=[libdir] if libdir else [],
        libraries=["m"],
    )
    builder.embedding_init_code(INIT_CODE)
    return builder
