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
ffibuilder.cdef((PKG / "_uring.h").read_text())
ffibuilder.set_source(
    "uringsend._uring",
    (PKG / "_uring.c").read_text(),
    extra_objects=[_liburing_static()],
    extra_compile_args=["-O2", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
