/* Probe helpers; the transfer engine is _core.c. */
#include <errno.h>
#include <string.h>
#include <liburing.h>

/* Set up and at once tear down a ring: 0 or -errno. */
int us_try_setup(unsigned entries, unsigned flags)
{
    struct io_uring ring;
    int ret = io_uring_queue_init(entries, &ring, flags);
    if (ret == 0)
        io_uring_queue_exit(&ring);
    return ret;
}

/* supported[i] = 1 when the kernel knows opcode i. Returns the number of opcodes probed. */
int us_probe_ops(unsigned char *supported, unsigned n)
{
    struct io_uring_probe *probe = io_uring_get_probe();
    unsigned i;

    if (!probe)
        return -errno ? -errno : -ENOSYS;
    for (i = 0; i < n; i++)
        supported[i] = io_uring_opcode_supported(probe, (int)i) ? 1 : 0;
    io_uring_free_probe(probe);
    return (int)n;
}
