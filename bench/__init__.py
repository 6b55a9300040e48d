"""The uringsend benchmark: ``python -m bench`` (see ``python -m bench --help``).

Every contender sends the same warm files over loopback TCP to a client in another process, on the
same machine in the same run; blocking splice(2) through a pipe is the reference.
"""
