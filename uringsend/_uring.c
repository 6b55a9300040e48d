/* C side of uringsend: small helpers so Python makes one call per chain or per batch of CQEs. */
#include <errno.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>
#include <liburing.h>

/* Newer than liburing 2.3's headers; values from the kernel UAPI. */
#ifndef IORING_SEND_ZC_REPORT_USAGE
#define IORING_SEND_ZC_REPORT_USAGE (1U << 3)
#endif
#ifndef IORING_NOTIF_USAGE_ZC_COPIED
#define IORING_NOTIF_USAGE_ZC_COPIED (1U << 31)
#endif
#ifndef IORING_OP_PIPE
#define IORING_OP_PIPE 62
#endif
#define IORING_OP_LAST_KNOWN (IORING_OP_PIPE + 1)
/* Our own pseudo-opcode: SEND_ZC from a registered buffer. */
#define US_OP_SEND_ZC_FIXED 250

struct us_op {
    uint64_t user_data;
    uint64_t addr;
    int64_t off;
    int64_t off_in;
    int32_t fd;
    int32_t fd_in;
    uint32_t len;
    uint32_t op_flags;
    uint16_t zc_flags;
    uint16_t buf_index;
    uint8_t opcode;
    uint8_t sqe_flags;
};

struct us_cqe {
    uint64_t user_data;
    int32_t res;
    uint32_t flags;
};

int us_queue_init(unsigned entries, struct io_uring *ring, unsigned flags, unsigned cq_entries)
{
    struct io_uring_params p;
    memset(&p, 0, sizeof(p));
    p.flags = flags;
    if (cq_entries) {
        p.flags |= IORING_SETUP_CQSIZE;
        p.cq_entries = cq_entries;
    }
    return io_uring_queue_init_params(entries, ring, &p);
}

unsigned us_sq_entries(struct io_uring *ring) { return ring->sq.ring_entries; }
unsigned us_cq_entries(struct io_uring *ring) { return ring->cq.ring_entries; }
int us_ring_fd(struct io_uring *ring) { return ring->ring_fd; }

static int op_known(uint8_t opcode)
{
    switch (opcode) {
    case IORING_OP_NOP: case IORING_OP_SPLICE: case IORING_OP_TEE: case IORING_OP_READ_FIXED:
    case IORING_OP_READ: case IORING_OP_SEND: case IORING_OP_SEND_ZC: case US_OP_SEND_ZC_FIXED:
    case IORING_OP_POLL_ADD: case IORING_OP_ASYNC_CANCEL:
        return 1;
    }
    return 0;
}

static void prep_one(struct io_uring_sqe *sqe, const struct us_op *op)
{
    void *buf = (void *)(uintptr_t)op->addr;

    switch (op->opcode) {
    case IORING_OP_NOP:
        io_uring_prep_nop(sqe);
        break;
    case IORING_OP_SPLICE:
        io_uring_prep_splice(sqe, op->fd_in, op->off_in, op->fd, op->off, op->len, op->op_flags);
        break;
    case IORING_OP_TEE:
        io_uring_prep_tee(sqe, op->fd_in, op->fd, op->len, op->op_flags);
        break;
    case IORING_OP_READ_FIXED:
        io_uring_prep_read_fixed(sqe, op->fd, buf, op->len, (uint64_t)op->off, op->buf_index);
        break;
    case IORING_OP_READ:
        io_uring_prep_read(sqe, op->fd, buf, op->len, (uint64_t)op->off);
        break;
    case IORING_OP_SEND:
        io_uring_prep_send(sqe, op->fd, buf, op->len, (int)op->op_flags);
        break;
    case IORING_OP_SEND_ZC:
        io_uring_prep_send_zc(sqe, op->fd, buf, op->len, (int)op->op_flags, op->zc_flags);
        break;
    case US_OP_SEND_ZC_FIXED:
        io_uring_prep_send_zc_fixed(sqe, op->fd, buf, op->len, (int)op->op_flags, op->zc_flags,
                                    op->buf_index);
        break;
    case IORING_OP_POLL_ADD:
        io_uring_prep_poll_add(sqe, op->fd, op->op_flags);
        break;
    case IORING_OP_ASYNC_CANCEL:
        io_uring_prep_cancel64(sqe, op->addr, 0);
        break;
    }
    sqe->flags |= op->sqe_flags;
    io_uring_sqe_set_data64(sqe, op->user_data);
}

/*
 * Prepare as many whole chains from ops[0..n) as the SQ has room for; never part of a chain,
 * because a chain ends at a submission boundary even with IOSQE_IO_LINK set.
 * Returns the number of ops prepared (a chain boundary), or -EINVAL for an unknown opcode
 * (nothing of that chain is prepared).
 */
int us_prep(struct io_uring *ring, const struct us_op *ops, unsigned n)
{
    unsigned done = 0;

    while (done < n) {
        unsigned len = 1, i;
        while (done + len - 1 < n - 1 &&
               (ops[done + len - 1].sqe_flags & (IOSQE_IO_LINK | IOSQE_IO_HARDLINK)))
            len++;
        if (io_uring_sq_space_left(ring) < len)
            break;
        for (i = 0; i < len; i++)
            if (!op_known(ops[done + i].opcode))
                return done ? (int)done : -EINVAL;
        for (i = 0; i < len; i++)
            prep_one(io_uring_get_sqe(ring), &ops[done + i]);
        done += len;
    }
    return (int)done;
}

static unsigned copy_ready(struct io_uring *ring, struct us_cqe *out, unsigned max)
{
    struct io_uring_cqe *cqe;
    unsigned head, count = 0;

    io_uring_for_each_cqe(ring, head, cqe) {
        if (count == max)
            break;
        out[count].user_data = cqe->user_data;
        out[count].res = cqe->res;
        out[count].flags = cqe->flags;
        count++;
    }
    io_uring_cq_advance(ring, count);
    return count;
}

/*
 * Copy up to max CQEs into out. With wait_nr > 0, first wait (timeout_ns < 0: no limit) for that
 * many. CQEs that overflowed stay invisible until io_uring_enter(GETEVENTS) flushes them, and
 * with DEFER_TASKRUN completions are only posted by GETEVENTS: both are handled here.
 * Returns the count copied, or -errno (-EINTR on a signal); a timeout is not an error.
 */
int us_reap(struct io_uring *ring, struct us_cqe *out, unsigned max, unsigned wait_nr, int64_t timeout_ns)
{
    unsigned count;
    int ret;

    if (wait_nr) {
        struct io_uring_cqe *cqe;
        struct __kernel_timespec ts, *tsp = NULL;
        if (timeout_ns >= 0) {
            ts.tv_sec = timeout_ns / 1000000000LL;
            ts.tv_nsec = timeout_ns % 1000000000LL;
            tsp = &ts;
        }
        ret = io_uring_wait_cqes(ring, &cqe, wait_nr, tsp, NULL);
        if (ret < 0 && ret != -ETIME)
            return ret;
    } else {
        /* Always: with DEFER_TASKRUN, completions (and the next link members) wait in task work
         * that only GETEVENTS runs, whether or not some CQEs are already visible. */
        ret = io_uring_get_events(ring);
        if (ret < 0 && ret != -EAGAIN && ret != -EBUSY && ret != -EINTR)
            return ret;
    }
    count = copy_ready(ring, out, max);
    while (count < max && (IO_URING_READ_ONCE(*ring->sq.kflags) & IORING_SQ_CQ_OVERFLOW)) {
        ret = io_uring_get_events(ring);
        if (ret < 0 && ret != -EAGAIN && ret != -EBUSY)
            return count ? (int)count : ret;
        unsigned more = copy_ready(ring, out + count, max - count);
        if (!more)
            break;
        count += more;
    }
    return (int)count;
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

/* A shared read-only mapping of a file range; returns its address, or 0 with -errno in *err.
 * Done here rather than with Python's mmap, which keeps a duplicate of the fd for its lifetime. */
uint64_t us_map_file(int fd, uint64_t length, int64_t offset, int *err)
{
    void *p = mmap(NULL, length, PROT_READ, MAP_SHARED, fd, offset);
    if (p == MAP_FAILED) {
        *err = -errno;
        return 0;
    }
    *err = 0;
    return (uint64_t)(uintptr_t)p;
}

int us_unmap(uint64_t addr, uint64_t length)
{
    return munmap((void *)(uintptr_t)addr, length) ? -errno : 0;
}

/* Drop the page-table entries of a file mapping's range (the page cache keeps the data): RSS then
 * stays bounded by what is in flight. Safe while the kernel holds the pages: pins hold the pages,
 * not the mapping, and a later copy from the range faults them back in. */
int us_drop_pages(uint64_t addr, uint64_t length)
{
    return madvise((void *)(uintptr_t)addr, length, MADV_DONTNEED) ? -errno : 0;
}
