"""Limits of the resources the engine pools (it keeps its own pipes, buffers and mappings)."""


def pipe_max_size():
    """/proc/sys/fs/pipe-max-size: the largest pipe an unprivileged F_SETPIPE_SZ may ask for."""
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return int(f.read())
    except OSError:
        return 1 << 20
