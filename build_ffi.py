"""cffi API-mode build of uringsend._uring: declarations from _uring.h, helpers from _uring.c."""
import pathlib
import subprocess

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
PKG = HERE / "uringsend"


def _liburing_static():
    """Path of Debian's liburing.a, so the extension needs no liburing .so at run time."""
    try:
        libdir = subprocess.run(["pkg-config", "--variable=libdir", "liburing"],
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        libdir = "/usr/lib/x86_64-linux-gnu"
    return str(pathlib.Path(libdir) / "liburing.a")


ffibuilder = FFI()
# _core.h is both C and cdef: the engine's structs have one definition.
ffibuilder.cdef((PKG / "_core.h").read_text() + (PKG / "_uring.h").read_text())
# The constants newer than liburing 2.3's headers, then the engine's interface; the code is in
# _core.c (the engine) and _probe.c. cffi writes its generated module as uringsend/_uring.c.
ffibuilder.set_source(
    "uringsend._uring",
    '#include <liburing.h>\n'
    '#ifndef IORING_SEND_ZC_REPORT_USAGE\n#define IORING_SEND_ZC_REPORT_USAGE (1U << 3)\n#endif\n'
    '#ifndef IORING_NOTIF_USAGE_ZC_COPIED\n#define IORING_NOTIF_USAGE_ZC_COPIED (1U << 31)\n#endif\n'
    '#ifndef IORING_OP_PIPE\n#define IORING_OP_PIPE 62\n#endif\n'
    '#define IORING_OP_LAST_KNOWN (IORING_OP_PIPE + 1)\n'
    '#include "_core.h"\n'
    'int us_try_setup(unsigned entries, unsigned flags);\n'
    'int us_probe_ops(unsigned char *supported, unsigned n);\n',
    sources=[str((PKG / name).relative_to(HERE)) for name in ("_core.c", "_probe.c")],
    include_dirs=[str(PKG)],
    extra_objects=[_liburing_static()],
    extra_compile_args=["-O2", "-Wall"],
)

# ---- sanitizer build (`make test-asan` sets URINGSEND_SANITIZE=1); only this block ----------
# AddressSanitizer + UndefinedBehaviorSanitizer, a UB report is fatal. Appended after set_source()'s
# own flags, so -O1 wins over -O2. The extension then needs libasan first in the process:
# the Makefile preloads it.
import os  # noqa: E402 (kept inside this block)
if os.environ.get("URINGSEND_SANITIZE") == "1":
    _SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                 "-fno-omit-frame-pointer", "-g", "-O1"]
    _kwds = ffibuilder._assigned_source[3]  # set_source()'s keyword arguments, as cffi keeps them
    _kwds["extra_compile_args"] = list(_kwds.get("extra_compile_args", ())) + _SANITIZE
    _kwds["extra_link_args"] = list(_kwds.get("extra_link_args", ())) + _SANITIZE[:1]
# ---- end of sanitizer build ------------------------------------------------------------------

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
