"""cffi embedding-mode build of libtfem.so: the C API over the Python client.

The public functions of tfem.h are plain C, written below. Each one starts
the embedded interpreter once (pthread_once), checks its pointers, and
calls into Python through the `_tfem_py_*` entry points that tfem.c_api
implements. Starting Python ourselves, rather than leaving it to cffi,
lets us:
- name the interpreter this library was built for (program_name), so
  sys.prefix is the virtual environment it was installed into whatever
  PATH says;
- notice a failed start and return -1/ENOSYS instead of cffi's silent 0;
- refuse a host that already runs a different Python version;
- take the GIL around fork() (pthread_atfork), so a fork while another
  thread is inside Python does not deadlock the child.
"""

from __future__ import annotations

import pathlib
import sys
import sysconfig

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent

INTERNAL_API = """
struct tfem_stat { uint64_t size; int state; int spilled; double created; };
int _tfem_py_ping(void);
int _tfem_py_open(const char *name, int flags, double timeout);
int64_t _tfem_py_write(int fd, const void *buf, size_t count);
int64_t _tfem_py_read(int fd, void *buf, size_t count);
int64_t _tfem_py_lseek(int fd, int64_t offset, int whence);
int _tfem_py_stat(const char *name, struct tfem_stat *st);
int _tfem_py_fstat(int fd, struct tfem_stat *st);
int _tfem_py_close(int fd);
int _tfem_py_unlink(const char *name);
"""

C_WRAPPERS = r"""
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "tfem.h"

%(prototypes)s

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

static int tfem_ready(void) {
    pthread_once(&tfem_once, tfem_start);
    if (tfem_started != 1) {
        errno = ENOSYS;
        return 0;
    }
    return 1;
}

int tfem_open_timeout(const char *name, int flags, double timeout_seconds) {
    if (!tfem_ready()) return -1;
    if (name == NULL) { errno = EFAULT; return -1; }
    if (timeout_seconds != timeout_seconds) { errno = EINVAL; return -1; } /* NaN */
    return _tfem_py_open(name, flags, timeout_seconds);
}

int tfem_open(const char *name, int flags) { return tfem_open_timeout(name, flags, -1.0); }

ssize_t tfem_write(int fd, const void *buf, size_t count) {
    if (!tfem_ready()) return -1;
    if (buf == NULL && count) { errno = EFAULT; return -1; }
    if (count > SSIZE_MAX) { errno = EINVAL; return -1; }
    return (ssize_t)_tfem_py_write(fd, buf, count);
}

ssize_t tfem_read(int fd, void *buf, size_t count) {
    if (!tfem_ready()) return -1;
    if (buf == NULL && count) { errno = EFAULT; return -1; }
    if (count > SSIZE_MAX) { errno = EINVAL; return -1; }
    return (ssize_t)_tfem_py_read(fd, buf, count);
}

off_t tfem_lseek(int fd, off_t offset, int whence) {
    if (!tfem_ready()) return -1;
    return (off_t)_tfem_py_lseek(fd, (int64_t)offset, whence);
}

int tfem_stat(const char *name, struct tfem_stat *st) {
    if (!tfem_ready()) return -1;
    if (name == NULL || st == NULL) { errno = EFAULT; return -1; }
    return _tfem_py_stat(name, st);
}

int tfem_fstat(int fd, struct tfem_stat *st) {
    if (!tfem_ready()) return -1;
    if (st == NULL) { errno = EFAULT; return -1; }
    return _tfem_py_fstat(fd, st);
}

int tfem_close(int fd) {
    if (!tfem_ready()) return -1;
    return _tfem_py_close(fd);
}

int tfem_unlink(const char *name) {
    if (!tfem_ready()) return -1;
    if (name == NULL) { errno = EFAULT; return -1; }
    return _tfem_py_unlink(name);
}
"""

INIT_CODE = """
from _tfem_shim import ffi
import tfem.c_api
tfem.c_api.install(ffi)
"""


def make_builder(python: str = sys.executable) -> FFI:
    """The builder for libtfem.so, starting `python`'s environment."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    builder = FFI()
    builder.embedding_api(INTERNAL_API)
    prototypes = "\n".join(line for line in INTERNAL_API.splitlines() if line.startswith(("int", "void")))
    builder.set_source(
        "_tfem_shim",
        C_WRAPPERS.replace("%(prototypes)s", prototypes),
        include_dirs=[str(HERE / "include")],
        define_macros=[("TFEM_BUILD_PYTHON", '"%s"' % python.replace('"', '\\"'))],
        extra_compile_args=["-O2", "-Wall", "-Werror=implicit-function-declaration"],
        extra_link_args=[f"-Wl,-rpath,{libdir}"] if libdir else [],
        library_dirs=[libdir] if libdir else [],
    )
    builder.embedding_init_code(INIT_CODE)
    return builder
