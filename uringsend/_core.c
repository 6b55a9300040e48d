/*
 * uringsend's transfer engine: everything that happens per SQE and per CQE.
 *
 * Python starts a transfer with one call (us_start) and drives the ring with another (us_run),
 * which submits, reaps, advances every transfer and returns a batch of what changed for the
 * transfers Python watches. Kernel facts this file relies on are numbered in docs/kernel-facts.md
 * and cited as [KF n].
 *
 * A transfer has at most one chain in flight, so its bytes reach the socket in order. A chain is a
 * window of chunks linked with IOSQE_IO_LINK and submitted whole [KF 4]; when its last result is in
 * the transfer looks at what happened and builds the next one from the first byte the socket did
 * not take: a short fill means the file ended; a short send, -EAGAIN or a member cancelled by a
 * broken link is retried from that byte; any other error ends the transfer.
 *
 * File descriptors: a transfer installs the caller's socket (and, for the modes that read the
 * file through io_uring, the file) into slots of the ring's registered file table with a
 * FILES_UPDATE SQE submitted by us_start itself, so the caller may close their fds as soon as
 * us_start returns. The final chain ends with a FILES_UPDATE that empties those slots, so a
 * caller's close() really closes the connection once the transfer is done. Without free slots the
 * fds are duplicated instead.
 *
 * Memory: no operation's memory (registered buffer, mapping, header bytes, pipe) is given back
 * before every CQE of that operation arrived, the SEND_ZC notification included [KF 11, 12]. A
 * core closed with operations still out keeps what they reference for the life of the process.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <liburing.h>

#include "_core.h"

#ifndef IORING_SEND_ZC_REPORT_USAGE
#define IORING_SEND_ZC_REPORT_USAGE (1U << 3)
#endif
#ifndef IORING_NOTIF_USAGE_ZC_COPIED
#define IORING_NOTIF_USAGE_ZC_COPIED (1U << 31)
#endif

#define MAX_STALLS 8           /* chains in a row that moved no byte before a transfer gives up */
#define WINDOW 8               /* chunks per chain */
#define CHAIN_BYTES (8u << 20) /* bytes one chain of a mapping-based transfer may carry */
#define MAX_CHAIN (4 + 2 * WINDOW)
#define SEND_FLAGS (MSG_WAITALL | MSG_NOSIGNAL) /* WAITALL: a short send breaks the link [KF 2] */
#define ERESTARTSYS 512        /* leaked by a cancelled splice running in io-wq [KF 8] */
#define EVENTS_INLINE 4
#define CHANGES_MAX 256
#define PAGE 4096
#define STREAM_SLOTS 64        /* the last slots of the registered buffer table: stream buffers */
#define BUF_TABLE 1024         /* table size when a stream registers it before the pool */
#define COPIED_RUN 8           /* US_MODE_AUTO: copied notifications in a row before copying sends */

enum role { R_NONE, R_INSTALL, R_UNSLOT, R_POLL, R_HEADER, R_FILL, R_SEND, R_CANCEL, R_RAW, R_TEE, R_TRAILER };
enum op_state { OP_FREE, OP_RESULT, OP_NOTIF };
enum wait_kind { W_NONE, W_BUFFER, W_BUDGET };

struct op {
    struct xfer *x;          /* owner; NULL for a raw op */
    int64_t offset;          /* file offset of the chunk (-1 header or trailer) */
    uint32_t gen;            /* high half of user_data: a late CQE never reaches a newer op */
    uint32_t next_free;
    uint32_t len;
    int32_t res;
    int16_t buf;             /* registered buffer index held, or -1 */
    uint8_t opcode;
    uint8_t role;
    uint8_t state;
    uint8_t report;          /* SEND_ZC with IORING_SEND_ZC_REPORT_USAGE */
    uint8_t in_chain;        /* a member of its transfer's chain (not an install, cancel, unslot) */
};

/* A read-only shared mapping of a whole file, with a descriptor of its own for the truncation
 * check. Cached ones belong to the core's mapping cache; a large one to its transfer. */
struct us_map {
    uint64_t addr;
    uint64_t length;
    uint64_t dev, ino;
    int64_t mtime_ns;
    uint64_t last_use;
    int fd;
    int users;               /* active transfers sending from it */
    uint8_t large;           /* not cached: drop released pages, unmapped by its last user */
};

struct pipe {
    int r, w;
    uint32_t capacity;
    struct pipe *next;
};

struct xfer {
    struct us_xfer pub;      /* first: a struct us_xfer * is a struct xfer * */
    struct us_core *core;    /* NULL once the core dropped it */
    int refs;                /* core (while active) + Python handle; atomic */
    int64_t pos;             /* first file byte not yet accepted by the socket */
    uint8_t *header;         /* this allocation's tail */
    uint32_t header_len;
    uint32_t trailer_len;    /* trailer bytes follow the header's */
    int sock, file;          /* slot index when *_fixed, else our own duplicate, else -1 */
    uint8_t sock_fixed, file_fixed, sock_held, file_held, uses_file;
    int32_t install_fd[2];   /* read by FILES_UPDATE: lives as long as the transfer */
    struct us_map *map;
    struct pipe *pipe;
    uint32_t chunk, window;
    uint8_t zc, cancelled, poll_first, broke, final_chain, starting;
    unsigned stalls;
    int32_t last_res;
    int64_t mark_pos;
    uint64_t mark_header;    /* header + trailer bytes sent when the chain was built */
    unsigned chain_left, outstanding;
    uint64_t chain[MAX_CHAIN];   /* user_data of the chain's members, for cancels */
    unsigned chain_len;
    unsigned cancel_left;
    uint8_t cancel_found;
    uint32_t cap_events;
    struct us_event inline_events[EVENTS_INLINE];
    uint8_t in_ready, waiting, in_changes;
    uint32_t change_bits;
    struct xfer *next_ready, *next_wait, *next_change, *prev_active, *next_active;
    struct tee *tee;         /* a destination of ring.tee(): the group runs the chains */
    /* Memory source (us_send, us_stream): the caller's memory, pinned by Python until settled. */
    uint8_t *mem;
    uint64_t wrap;           /* us_stream: the circular buffer's size (offsets wrap); 0 flat */
    uint16_t buf_index;      /* us_stream: its registered buffer slot */
    uint8_t open;            /* us_stream: more bytes may be committed; pos == end is not the end */
    uint8_t copy_when_copied; /* US_MODE_AUTO: switch to SEND after COPIED_RUN copied notifications */
    uint8_t copied_run;
    struct mem_range *stash; /* released ranges that arrived ahead of released_upto */
    unsigned nstash, cap_stash;
};

struct mem_range {
    uint64_t offset, len;
};

/* One file to n sockets (us_tee): the page cache is read once per chunk into the source pipe,
 * IORING_OP_TEE duplicates the pipe's page references into a pipe per further socket. Each
 * destination is a transfer of its own (position, events, errors); the group has one chain. */
struct tee {
    unsigned n;
    struct xfer **dest;
    struct pipe *src;
    struct pipe **pipes;     /* pipes[i]: where destination i gets its copy of the references */
    int file;
    uint8_t file_fixed, file_held;
    int64_t end;
    unsigned window, chain_left, outstanding, stalls, chain_len, cancel_left;
    uint8_t cancel_found;
    int64_t *mark;           /* positions when the chain in flight was built */
    int64_t *pos;            /* scratch for building */
    uint64_t *chain;         /* user_data of the chain's members */
};

struct pool {
    uint8_t *base;
    uint32_t count, size;
    uint32_t *free_stack;
    uint32_t nfree;
    uint8_t *refs;
};

struct us_core {
    struct io_uring ring;
    int flags;
    unsigned sq_entries;
    struct us_stats st;
    struct op *ops;
    uint32_t nops, free_op;
    int32_t *free_slots;
    uint32_t nslots, nfree_slots;
    unsigned urgent;         /* prepared SQEs that must be submitted now */
    struct io_uring_sqe *last_sqe;
    struct xfer *ready_head, *ready_tail;
    struct xfer *wait_head;  /* starved for a buffer or zero-copy budget */
    struct xfer *change_head, *change_tail;
    struct xfer *active;
    struct us_change changes[CHANGES_MAX];
    unsigned nchanges;
    struct us_change *raw_q;  /* raw CQEs not yet handed out */
    unsigned raw_n, raw_cap, raw_head;
    struct pipe *idle_pipes;
    uint32_t pipe_size, max_idle_pipes;
    struct pool pool;
    unsigned buf_table;      /* slots of the registered buffer table (sparse); 0 none */
    uint64_t stream_slots;   /* bit i: slot buf_table - STREAM_SLOTS + i holds a stream buffer */
    uint32_t chunk_size, copy_chunk_size;
    uint64_t zc_budget;
    struct us_map **maps;    /* the mapping cache: one mapping per file, shared by its transfers */
    unsigned nmaps, cap_maps, keep_maps;
    uint64_t large_map, map_clock;
    int start_error;
    int64_t start_size;
    struct us_trace *trace;
    unsigned trace_n, trace_cap;
    int tracing;
    int closed;
    uint64_t next_id;
    int64_t now;
};

/* What a FILES_UPDATE that empties slots writes; read by the kernel whenever the op runs. */
static int32_t no_fds[2] = {-1, -1};

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static uint64_t zc_charge(uint64_t n) { return ((n >> 12) + 2) << 12; } /* [KF 16] */

/* ---- op table ------------------------------------------------------------------------------ */

static int grow_ops(struct us_core *c)
{
    uint32_t n = c->nops ? c->nops * 2 : 256, i;
    struct op *ops = realloc(c->ops, n * sizeof(*ops));
    if (!ops)
        return -ENOMEM;
    memset(ops + c->nops, 0, (n - c->nops) * sizeof(*ops));
    for (i = (c->nops ? c->nops : 1); i < n; i++)  /* index 0 is never used: user_data != 0 */
        ops[i].next_free = (i + 1 < n) ? i + 1 : 0;
    c->free_op = c->nops ? c->nops : 1;
    c->ops = ops;
    c->nops = n;
    return 0;
}

static uint32_t op_new(struct us_core *c, struct xfer *x, uint8_t opcode, uint8_t role)
{
    uint32_t i;
    struct op *op;
    if (!c->free_op && grow_ops(c) < 0)
        return 0;
    i = c->free_op;
    op = &c->ops[i];
    c->free_op = op->next_free;
    op->gen++;
    op->x = x;
    op->offset = -1;
    op->len = 0;
    op->res = 0;
    op->buf = -1;
    op->opcode = opcode;
    op->role = role;
    op->state = OP_RESULT;
    op->report = 0;
    op->in_chain = 0;
    return i;
}

static void op_free(struct us_core *c, uint32_t i)
{
    c->ops[i].state = OP_FREE;
    c->ops[i].x = NULL;
    c->ops[i].next_free = c->free_op;
    c->free_op = i;
}

static uint64_t op_user_data(struct us_core *c, uint32_t i)
{
    return ((uint64_t)c->ops[i].gen << 32) | i;
}

static struct us_map *map_new(int fd, const struct stat *st, int large, int *err);
static int map_free(struct us_map *m);
static void map_close_fd(struct us_map *m);
static struct us_map *map_get(struct us_core *c, int fd, const struct stat *st, int *err);
static void map_put(struct us_map *m);
static void maps_close(struct us_core *c);
static int dup_fd(int fd);
static void tee_pump(struct us_core *c, struct tee *t);
static void tee_on_result(struct us_core *c, uint32_t i, int32_t res);
static void tee_op_over(struct us_core *c, uint32_t i);
static void tee_cancel_dest(struct us_core *c, struct xfer *x);

/* ---- transfers: lists and timeline ---------------------------------------------------------- */

static void ready(struct us_core *c, struct xfer *x)
{
    if (x->in_ready)
        return;
    x->in_ready = 1;
    x->next_ready = NULL;
    if (c->ready_tail)
        c->ready_tail->next_ready = x;
    else
        c->ready_head = x;
    c->ready_tail = x;
}

static void wake_waiters(struct us_core *c, int kind)
{
    struct xfer **pp = &c->wait_head;
    while (*pp) {
        struct xfer *x = *pp;
        if (x->waiting == kind) {
            *pp = x->next_wait;
            x->waiting = W_NONE;
            ready(c, x);
        } else {
            pp = &x->next_wait;
        }
    }
}

static void wait_for(struct us_core *c, struct xfer *x, int kind)
{
    if (x->waiting)
        return;
    x->waiting = kind;
    x->next_wait = c->wait_head;
    c->wait_head = x;
}

/* A transfer enters the core's books: counted, and on the active list until it settles. */
static void activate(struct us_core *c, struct xfer *x)
{
    c->st.transfers_started++;
    c->st.transfers_active++;
    c->st.transfers_running++;
    x->next_active = c->active;
    if (c->active)
        c->active->prev_active = x;
    c->active = x;
}

/* No more bytes will be sent. */
static void mark_done(struct us_core *c, struct xfer *x)
{
    x->pub.done = 1;
    c->st.transfers_running--;
}

static void change(struct us_core *c, struct xfer *x, uint32_t bits)
{
    if (!x->pub.notify)
        return;
    /* A memory transfer's Python handle hears of releases only: its end (done, settled) is one
     * too, since it is what lets the caller's buffer go. */
    if (x->mem && (bits & (US_CH_DONE | US_CH_SETTLED)))
        bits |= US_CH_RELEASED;
    x->change_bits |= bits;
    if (x->in_changes)
        return;
    x->in_changes = 1;
    x->next_change = NULL;
    if (c->change_tail)
        c->change_tail->next_change = x;
    else
        c->change_head = x;
    c->change_tail = x;
}

static void mem_released(struct xfer *x, int64_t offset, uint32_t n, int copied);

static void event(struct us_core *c, struct xfer *x, uint8_t kind, int64_t offset, uint32_t n, int copied)
{
    struct us_event *ev;
    if (kind == US_RELEASED && offset >= 0)
        x->pub.released += n;  /* counted even if the timeline below cannot grow */
    if (x->mem && kind == US_RELEASED)
        mem_released(x, offset, n, copied);
    if (x->wrap) {  /* a stream keeps counters, not a timeline that grows as long as it lives */
        if (kind == US_RELEASED) {
            x->pub.released_ns = c->now;
            change(c, x, US_CH_RELEASED);
        }
        return;
    }
    if (x->pub.nevents == x->cap_events) {
        uint32_t cap = x->cap_events * 2;
        struct us_event *grown;
        if (x->pub.events == x->inline_events) {
            grown = malloc(cap * sizeof(*grown));
            if (grown)
                memcpy(grown, x->inline_events, sizeof(x->inline_events));
        } else {
            grown = realloc(x->pub.events, cap * sizeof(*grown));
        }
        if (!grown)
            return;  /* out of memory: the timeline misses this entry, the transfer goes on */
        x->pub.events = grown;
        x->cap_events = cap;
    }
    ev = &x->pub.events[x->pub.nevents++];
    ev->offset = offset;
    ev->t_ns = c->now;
    ev->nbytes = n;
    ev->kind = kind;
    ev->copied = (int8_t)copied;
    if (kind == US_RELEASED) {
        x->pub.released_ns = c->now;
        change(c, x, US_CH_RELEASED);
    }
}

static void xfer_free(struct xfer *x)
{
    if (x->pub.events != x->inline_events)
        free(x->pub.events);
    free(x->stash);
    free(x);
}

static void xfer_unref(struct xfer *x)
{
    if (__atomic_sub_fetch(&x->refs, 1, __ATOMIC_ACQ_REL) == 0)
        xfer_free(x);
}

void us_xfer_put(struct us_xfer *pub)
{
    xfer_unref((struct xfer *)pub);
}

static void fail(struct xfer *x, int32_t res, uint8_t opcode, int on_file)
{
    if (x->pub.error)
        return;
    x->pub.error = -res;
    x->pub.err_kind = US_ERR_OP;
    x->pub.err_opcode = opcode;
    x->pub.err_on_file = (uint8_t)on_file;
}

/* ---- pipes, buffers, budget, slots ---------------------------------------------------------- */

static struct pipe *pipe_get(struct us_core *c, int *err)
{
    struct pipe *p = c->idle_pipes;
    int fds[2];
    if (p) {
        c->idle_pipes = p->next;
        c->st.pipes_idle--;
        return p;
    }
    p = malloc(sizeof(*p));
    if (!p) {
        *err = -ENOMEM;
        return NULL;
    }
    if (pipe2(fds, O_CLOEXEC) < 0) {
        *err = -errno;
        free(p);
        return NULL;
    }
    p->r = fds[0];
    p->w = fds[1];
    /* Past pipe-max-size or pipe-user-pages limits this fails: keep what the kernel gave [KF 9]. */
    fcntl(p->w, F_SETPIPE_SZ, (int)c->pipe_size);
    p->capacity = (uint32_t)fcntl(p->w, F_GETPIPE_SZ);
    c->st.pipes_created++;
    return p;
}

static void pipe_close(struct pipe *p)
{
    close(p->r);
    close(p->w);
    free(p);
}

static int pipe_pending(struct pipe *p)
{
    int n = 0;
    return ioctl(p->r, FIONREAD, &n) < 0 ? -errno : n;
}

/* Read out and discard what a broken chain left in the pipe; returns the byte count. */
static uint64_t pipe_drain(struct pipe *p)
{
    char scratch[16384];
    uint64_t total = 0;
    int n;
    while ((n = pipe_pending(p)) > 0) {
        ssize_t got = read(p->r, scratch, (size_t)n < sizeof(scratch) ? (size_t)n : sizeof(scratch));
        if (got <= 0)
            break;
        total += (uint64_t)got;
    }
    return total;
}

static void pipe_put(struct us_core *c, struct pipe *p)
{
    if (pipe_pending(p) != 0 || c->st.pipes_idle >= c->max_idle_pipes) {
        pipe_close(p);
        return;
    }
    p->next = c->idle_pipes;
    c->idle_pipes = p;
    c->st.pipes_idle++;
}

static int buffer_get(struct us_core *c)
{
    struct pool *pool = &c->pool;
    int i;
    if (!pool->nfree)
        return -1;
    i = (int)pool->free_stack[--pool->nfree];
    pool->refs[i] = 2;  /* one reference for the read, one for the send */
    c->st.buffers_free--;
    return i;
}

static void buffer_let_go(struct us_core *c, int i)
{
    struct pool *pool = &c->pool;
    if (--pool->refs[i] == 0) {
        pool->free_stack[pool->nfree++] = (uint32_t)i;
        c->st.buffers_free++;
        wake_waiters(c, W_BUFFER);
    }
}

static int slot_get(struct us_core *c)
{
    return c->nfree_slots ? c->free_slots[--c->nfree_slots] : -1;
}

static void slot_put(struct us_core *c, int slot)
{
    c->free_slots[c->nfree_slots++] = slot;
}

/* ---- SQEs ----------------------------------------------------------------------------------- */

static int submit(struct us_core *c)
{
    int ret;
    c->urgent = 0;
    c->st.enters++;
    /* GETEVENTS too: with DEFER_TASKRUN the next member of a link is issued from task work that
     * runs only on an enter with GETEVENTS [KF 22]. */
    ret = io_uring_submit_and_get_events(&c->ring);
    return ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY ? ret : 0;
}

/* Room for n SQEs, submitting what is prepared first if needed (a chain is never split: it
 * waits, whole, for that submission [KF 4]); 0 when there is none. */
static int room(struct us_core *c, unsigned n)
{
    if (io_uring_sq_space_left(&c->ring) >= n)
        return 1;
    if (io_uring_sq_ready(&c->ring)) {
        c->st.sq_full++;
        submit(c);
    }
    return io_uring_sq_space_left(&c->ring) >= n;
}

/* An SQE for op i, which becomes member number chain_len of x's chain. */
static struct io_uring_sqe *sqe_for(struct us_core *c, struct xfer *x, uint32_t i, int in_chain)
{
    struct io_uring_sqe *sqe = io_uring_get_sqe(&c->ring);
    io_uring_sqe_set_data64(sqe, op_user_data(c, i));
    if (x) {
        x->outstanding++;
        if (in_chain) {
            x->chain[x->chain_len++] = op_user_data(c, i);
            x->chain_left++;
            c->ops[i].in_chain = 1;
        }
    }
    c->st.ops_in_flight++;
    c->urgent++;
    c->last_sqe = sqe;
    return sqe;
}

static void use_sock(struct io_uring_sqe *sqe, struct xfer *x)
{
    if (x->sock_fixed)
        sqe->flags |= IOSQE_FIXED_FILE;
}

/* ---- building chains ------------------------------------------------------------------------ */

static uint32_t header_left(struct xfer *x) { return x->header_len - (uint32_t)x->pub.header_sent; }
static uint32_t trailer_left(struct xfer *x) { return x->trailer_len - (uint32_t)x->pub.trailer_sent; }
static uint64_t extra_sent(struct xfer *x) { return x->pub.header_sent + x->pub.trailer_sent; }

static void finish(struct us_core *c, struct xfer *x);
static void maybe_settle(struct us_core *c, struct xfer *x);

/* ---- memory sources ------------------------------------------------------------------------- */

/* Advance released_upto over the contiguous released prefix. Notifications may arrive out of
 * order [KF 13]: a range ahead of the prefix waits in the stash until the gap is filled. */
static void mem_released(struct xfer *x, int64_t offset, uint32_t n, int copied)
{
    unsigned k;
    if (copied > 0)
        x->pub.copied_bytes += n;
    else if (copied == 0)
        x->pub.zerocopy_bytes += n;
    if ((uint64_t)offset != x->pub.released_upto) {
        if (x->nstash == x->cap_stash) {
            unsigned cap = x->cap_stash ? x->cap_stash * 2 : 8;
            struct mem_range *grown = realloc(x->stash, cap * sizeof(*grown));
            if (!grown)
                return;  /* out of memory: released_upto stops short, never runs ahead */
            x->stash = grown;
            x->cap_stash = cap;
        }
        x->stash[x->nstash].offset = (uint64_t)offset;
        x->stash[x->nstash++].len = n;
        return;
    }
    x->pub.released_upto += n;
    for (k = 0; k < x->nstash;) {
        if (x->stash[k].offset == x->pub.released_upto) {
            x->pub.released_upto += x->stash[k].len;
            x->stash[k] = x->stash[--x->nstash];
            k = 0;
        } else {
            k++;
        }
    }
}

/* US_MODE_AUTO: a SEND_ZC the kernel copied anyway costs more than a SEND; once the notifications
 * say so COPIED_RUN times in a row (loopback and veth always copy [KF 15]), send with SEND. */
static void mem_notified(struct xfer *x, int copied)
{
    if (!x->copy_when_copied || !x->zc)
        return;
    if (copied != 1) {
        x->copied_run = 0;
        return;
    }
    if (++x->copied_run >= COPIED_RUN) {
        x->zc = 0;
        x->pub.fallback = US_FALLBACK_COPIED;
    }
}

/* Prepare one chunk of a memory source at pos: SEND_ZC (from the registered stream buffer, or
 * from the caller's memory within the zero-copy budget) or SEND. A stream's chunk stops at the
 * end of its buffer. Returns the chunk's length, 0 when starved for budget. */
static uint32_t mem_chunk(struct us_core *c, struct xfer *x, int64_t pos, int64_t end)
{
    uint64_t at = x->wrap ? (uint64_t)pos % x->wrap : (uint64_t)pos;
    uint8_t *addr = x->mem + at;
    uint32_t n = x->chunk, i;
    struct io_uring_sqe *sqe;
    if ((int64_t)n > end - pos)
        n = (uint32_t)(end - pos);
    if (x->wrap && n > x->wrap - at)
        n = (uint32_t)(x->wrap - at);
    if (x->zc && !x->wrap) {  /* unregistered pages count against RLIMIT_MEMLOCK [KF 16] */
        uint64_t charge = zc_charge(n);
        if (c->st.zc_bytes_unreleased && c->st.zc_bytes_unreleased + charge > c->zc_budget) {
            wait_for(c, x, W_BUDGET);
            return 0;
        }
        c->st.zc_bytes_unreleased += charge;
    }
    i = op_new(c, x, x->zc ? IORING_OP_SEND_ZC : IORING_OP_SEND, R_SEND);
    sqe = sqe_for(c, x, i, 1);
    if (x->zc && x->wrap) {
        io_uring_prep_send_zc_fixed(sqe, x->sock, addr, n, SEND_FLAGS, IORING_SEND_ZC_REPORT_USAGE,
                                    x->buf_index);
        c->ops[i].report = 1;
    } else if (x->zc) {
        io_uring_prep_send_zc(sqe, x->sock, addr, n, SEND_FLAGS, IORING_SEND_ZC_REPORT_USAGE);
        c->ops[i].report = 1;
    } else {
        io_uring_prep_send(sqe, x->sock, addr, n, SEND_FLAGS);
    }
    c->ops[i].offset = pos;
    c->ops[i].len = n;
    use_sock(sqe, x);
    sqe->flags |= IOSQE_IO_LINK;
    return n;
}

/* Register the sparse buffer table once: the pool takes its first slots, streams its last
 * STREAM_SLOTS (IORING_REGISTER_BUFFERS works once per ring; updates work any time). */
static int buf_table(struct us_core *c, unsigned nr)
{
    int ret;
    if (c->buf_table)
        return 0;
    ret = io_uring_register_buffers_sparse(&c->ring, nr);
    if (ret < 0)
        return ret;
    c->buf_table = nr;
    return 0;
}

static int buf_update(struct us_core *c, unsigned slot, const struct iovec *iov, unsigned n)
{
    int ret = io_uring_register_buffers_update_tag(&c->ring, slot, iov, NULL, n);
    return ret < 0 ? ret : 0;
}

/* A settled stream's buffer leaves the table: nothing references it any more. */
static void stream_unregister(struct us_core *c, struct xfer *x)
{
    struct iovec none = {NULL, 0};
    unsigned bit = x->buf_index - (c->buf_table - STREAM_SLOTS);
    if (!c->closed)
        buf_update(c, x->buf_index, &none, 1);
    c->stream_slots &= ~(1ull << bit);
    x->wrap = 0;
}

static int build_body(struct us_core *c, struct xfer *x, int64_t pos, int64_t end, unsigned max_chunks)
{
    unsigned k;
    int built = 0;
    for (k = 0; k < max_chunks && pos < end; k++) {
        struct io_uring_sqe *sqe;
        uint32_t i, n;
        if (x->pub.mode == US_MODE_SPLICE) {
            struct pipe *p = x->pipe;
            uint32_t fill_flags = x->file_fixed ? SPLICE_F_FD_IN_FIXED : 0;
            /* From an unaligned offset a full pipe's worth spans one page more than the pipe has
             * slots: chunks end on page boundaries [KF 9]. */
            n = p->capacity - (uint32_t)(pos % PAGE);
            if ((int64_t)n > end - pos)
                n = (uint32_t)(end - pos);
            i = op_new(c, x, IORING_OP_SPLICE, R_FILL);
            if (!i)
                break;
            c->ops[i].offset = pos;
            c->ops[i].len = n;
            sqe = sqe_for(c, x, i, 1);
            io_uring_prep_splice(sqe, x->file, pos, p->w, -1, n, fill_flags);
            sqe->flags |= IOSQE_IO_LINK;
            i = op_new(c, x, IORING_OP_SPLICE, R_SEND);
            c->ops[i].offset = pos;
            c->ops[i].len = n;
            sqe = sqe_for(c, x, i, 1);
            io_uring_prep_splice(sqe, p->r, -1, x->sock, -1, n, 0);
            use_sock(sqe, x);
            sqe->flags |= IOSQE_IO_LINK;
        } else if (x->pub.mode == US_MODE_ZEROCOPY) {
            int b = buffer_get(c);
            uint8_t *addr;
            if (b < 0) {
                wait_for(c, x, W_BUFFER);
                break;
            }
            n = c->pool.size;
            if ((int64_t)n > end - pos)
                n = (uint32_t)(end - pos);
            addr = c->pool.base + (size_t)b * c->pool.size;
            i = op_new(c, x, IORING_OP_READ_FIXED, R_FILL);
            c->ops[i].offset = pos;
            c->ops[i].len = n;
            c->ops[i].buf = (int16_t)b;
            sqe = sqe_for(c, x, i, 1);
            io_uring_prep_read_fixed(sqe, x->file, addr, n, (uint64_t)pos, b);
            if (x->file_fixed)
                sqe->flags |= IOSQE_FIXED_FILE;
            sqe->flags |= IOSQE_IO_LINK;
            if (x->zc) {
                i = op_new(c, x, IORING_OP_SEND_ZC, R_SEND);
                sqe = sqe_for(c, x, i, 1);
                io_uring_prep_send_zc_fixed(sqe, x->sock, addr, n, SEND_FLAGS, IORING_SEND_ZC_REPORT_USAGE, b);
                c->ops[i].report = 1;
            } else {
                i = op_new(c, x, IORING_OP_SEND, R_SEND);
                sqe = sqe_for(c, x, i, 1);
                io_uring_prep_send(sqe, x->sock, addr, n, SEND_FLAGS);
            }
            c->ops[i].offset = pos;
            c->ops[i].len = n;
            c->ops[i].buf = (int16_t)b;
            use_sock(sqe, x);
            sqe->flags |= IOSQE_IO_LINK;
        } else if (x->mem) {
            n = mem_chunk(c, x, pos, end);
            if (!n)
                break;
        } else {
            uint8_t *addr = (uint8_t *)(uintptr_t)x->map->addr + pos;
            n = x->chunk;
            if ((int64_t)n > end - pos)
                n = (uint32_t)(end - pos);
            if (x->zc) {
                uint64_t charge = zc_charge(n);
                if (c->st.zc_bytes_unreleased && c->st.zc_bytes_unreleased + charge > c->zc_budget) {
                    wait_for(c, x, W_BUDGET);
                    break;
                }
                c->st.zc_bytes_unreleased += charge;
                i = op_new(c, x, IORING_OP_SEND_ZC, R_SEND);
                sqe = sqe_for(c, x, i, 1);
                io_uring_prep_send_zc(sqe, x->sock, addr, n, SEND_FLAGS, IORING_SEND_ZC_REPORT_USAGE);
                c->ops[i].report = 1;
            } else {
                i = op_new(c, x, IORING_OP_SEND, R_SEND);
                sqe = sqe_for(c, x, i, 1);
                io_uring_prep_send(sqe, x->sock, addr, n, SEND_FLAGS);
            }
            c->ops[i].offset = pos;
            c->ops[i].len = n;
            use_sock(sqe, x);
            sqe->flags |= IOSQE_IO_LINK;
        }
        pos += n;
        built = 1;
    }
    x->final_chain = built && pos >= end;
    return built;
}

/* Empty the transfer's slots at the end of its final chain (runs only if the chain is whole). */
static void build_unslot(struct us_core *c, struct xfer *x)
{
    struct io_uring_sqe *sqe;
    uint32_t i;
    if (!x->sock_fixed || !x->sock_held)
        return;
    i = op_new(c, x, IORING_OP_FILES_UPDATE, R_UNSLOT);
    if (!i)
        return;
    sqe = sqe_for(c, x, i, 1);
    c->ops[i].len = (x->file_fixed && x->file_held && x->file == x->sock + 1) ? 2 : 1;
    io_uring_prep_files_update(sqe, no_fds, c->ops[i].len, x->sock);
}

static void pump(struct us_core *c, struct xfer *x)
{
    unsigned need, per_chunk, k, unslot;
    uint32_t left, tleft;
    int64_t end;
    struct io_uring_sqe *sqe;
    int body = 0;

    if (x->tee) {
        tee_pump(c, x->tee);
        return;
    }
    if (x->chain_left || x->pub.done || x->waiting)
        return;
    left = header_left(x);
    tleft = trailer_left(x);
    if (x->open && !x->pub.error && !x->cancelled && x->pos >= x->pub.end)
        return;  /* an open stream waits for its next commit */
    if (x->pub.error || x->cancelled || (x->pos >= x->pub.end && !left && !tleft)) {
        finish(c, x);
        return;
    }
    if (x->stalls >= MAX_STALLS) {
        x->pub.error = x->last_res < 0 ? -x->last_res : EIO;
        x->pub.err_kind = US_ERR_STALL;
        finish(c, x);
        return;
    }
    per_chunk = (x->pub.mode == US_MODE_SPLICE || x->pub.mode == US_MODE_ZEROCOPY) ? 2 : 1;
    need = x->poll_first + (left ? 1 : 0) + x->window * per_chunk + (tleft ? 1 : 0);
    unslot = need < c->sq_entries;  /* room for emptying the slots at the tail of a final chain */
    if (!room(c, need + unslot)) {
        c->st.sq_full++;
        ready(c, x);  /* the next us_run tries again, after the kernel took what is queued */
        return;
    }
    if (x->pub.mode == US_MODE_SPLICE && !x->pipe) {
        int err = 0;
        x->pipe = pipe_get(c, &err);
        if (!x->pipe) {
            fail(x, err, IORING_OP_SPLICE, 1);
            finish(c, x);
            return;
        }
    }
    x->chain_len = 0;
    x->broke = 0;
    if (x->poll_first) {
        uint32_t i = op_new(c, x, IORING_OP_POLL_ADD, R_POLL);
        sqe = sqe_for(c, x, i, 1);
        io_uring_prep_poll_add(sqe, x->sock, POLLOUT);
        use_sock(sqe, x);
        sqe->flags |= IOSQE_IO_LINK;
    }
    if (left) {
        int more = x->pos < x->pub.end || tleft;
        uint32_t i = op_new(c, x, IORING_OP_SEND, R_HEADER);
        c->ops[i].len = left;
        sqe = sqe_for(c, x, i, 1);
        /* header and body leave as one stream */
        io_uring_prep_send(sqe, x->sock, x->header + x->pub.header_sent, left,
                           SEND_FLAGS | (more ? MSG_MORE : 0));
        use_sock(sqe, x);
        sqe->flags |= IOSQE_IO_LINK;
    }
    end = x->pub.end;
    k = x->window;
    if (x->pos < end)
        body = build_body(c, x, x->pos, end, k);
    else
        x->final_chain = 1;
    if (x->final_chain && tleft) {
        /* the trailer follows the body's last chunk in the same chain, as one stream */
        uint32_t i = op_new(c, x, IORING_OP_SEND, R_TRAILER);
        c->ops[i].len = tleft;
        sqe = sqe_for(c, x, i, 1);
        io_uring_prep_send(sqe, x->sock, x->header + x->header_len + x->pub.trailer_sent, tleft,
                           SEND_FLAGS);
        use_sock(sqe, x);
        sqe->flags |= IOSQE_IO_LINK;
        body = 1;
    }
    if (!body && !left && !x->poll_first) {
        x->chain_len = 0;
        return;  /* starved: a buffer or the budget will ready it */
    }
    if (x->open)
        x->final_chain = 0;  /* more may be committed: the socket's slot stays */
    if (x->final_chain && unslot)
        build_unslot(c, x);
    c->last_sqe->flags &= (uint8_t)~IOSQE_IO_LINK;  /* the last member ends the chain */
    x->poll_first = 0;
    x->mark_pos = x->pos;
    x->mark_header = extra_sent(x);
}

/* Pump the transfers readied so far. One readied again (no SQ room) waits for the next round; a
 * pump may settle and free its transfer, so nothing is read from it afterwards. */
static void pump_ready(struct us_core *c)
{
    struct xfer *x = c->ready_head, *next;
    c->ready_head = c->ready_tail = NULL;
    for (; x; x = next) {
        next = x->next_ready;
        x->in_ready = 0;
        pump(c, x);
    }
}

/* ---- ending a transfer ---------------------------------------------------------------------- */

static void release_sock(struct us_core *c, struct xfer *x)
{
    if (!x->sock_held)
        return;
    if (x->sock_fixed) {
        /* No final chain emptied the slot (an error or a cancel broke it): do it now, urgently,
         * so that a caller's close() closes the connection. */
        struct io_uring_sqe *sqe;
        uint32_t i;
        unsigned nfd = (x->file_fixed && x->file_held && x->file == x->sock + 1) ? 2 : 1;
        if (!room(c, 1) || !(i = op_new(c, x, IORING_OP_FILES_UPDATE, R_UNSLOT))) {
            ready(c, x);
            return;
        }
        c->ops[i].len = nfd;
        sqe = sqe_for(c, x, i, 0);
        io_uring_prep_files_update(sqe, no_fds, nfd, x->sock);
        x->sock_held = 0;
        if (nfd == 2)
            x->file_held = 0;
        return;
    }
    close(x->sock);
    x->sock_held = 0;
}

static void check_size(struct xfer *x)
{
    struct stat st;
    if (!x->map || x->pub.error || x->pos <= x->pub.offset)
        return;
    /* A file truncated mid-page keeps that page mapped, zero-filled past the new end: a send
     * through the mapping cannot see EOF there [KF 27]. */
    if (fstat(x->map->fd, &st) == 0 && x->pos > st.st_size) {
        x->pub.error = EFAULT;
        x->pub.err_kind = US_ERR_TRUNCATED;
        x->pub.err_size = st.st_size;
    }
}

static void finish(struct us_core *c, struct xfer *x)
{
    if (x->cancelled && !x->pub.error && (x->pos < x->pub.end || header_left(x) || trailer_left(x))) {
        x->pub.error = ECANCELED;
        x->pub.err_kind = US_ERR_CANCELLED;
    }
    /* A transfer that ended inside the us_start that took the file's size needs no second look:
     * its sends followed that fstat within the same call [KF 27]. */
    if ((x->pub.mode == US_MODE_MMAP || x->pub.mode == US_MODE_COPY) && !x->starting)
        check_size(x);
    release_sock(c, x);
    if (x->sock_held && x->sock_fixed)
        return;  /* no SQ room for emptying the slot yet: ready again */
    mark_done(c, x);
    change(c, x, US_CH_DONE);
    maybe_settle(c, x);
}

static void unlink_active(struct us_core *c, struct xfer *x)
{
    if (x->prev_active)
        x->prev_active->next_active = x->next_active;
    else
        c->active = x->next_active;
    if (x->next_active)
        x->next_active->prev_active = x->prev_active;
    x->prev_active = x->next_active = NULL;
}

/* Empty a registered file slot with the next submission; the slot goes back to the free list
 * when that FILES_UPDATE completes (no transfer is named: the transfer may be gone by then). */
static void unslot_now(struct us_core *c, int slot)
{
    struct io_uring_sqe *sqe;
    uint32_t i;
    if (room(c, 1) && (i = op_new(c, NULL, IORING_OP_FILES_UPDATE, R_UNSLOT))) {
        c->ops[i].offset = slot;
        c->ops[i].len = 1;
        sqe = sqe_for(c, NULL, i, 0);
        io_uring_prep_files_update(sqe, no_fds, 1, slot);
    } else {
        slot_put(c, slot);  /* no SQ room and no op: the next install into it replaces the file */
    }
}

/* The transfer is over for the kernel: report it, and drop the core's reference. */
static void settled(struct us_core *c, struct xfer *x)
{
    x->pub.settled = 1;
    c->st.transfers_active--;
    unlink_active(c, x);
    change(c, x, US_CH_SETTLED);
    if (!x->in_changes) {
        x->core = NULL;
        xfer_unref(x);
    }
}

static void maybe_settle(struct us_core *c, struct xfer *x)
{
    struct us_map *m;
    if (x->outstanding || !x->pub.done || x->pub.settled)
        return;
    if (x->pipe) {
        if (pipe_pending(x->pipe) > 0)
            x->pub.stranded += pipe_drain(x->pipe);
        pipe_put(c, x->pipe);
        x->pipe = NULL;
    }
    if (x->file_held) {
        if (x->file_fixed)
            unslot_now(c, x->file);  /* not emptied with the socket's slot */
        else
            close(x->file);
        x->file_held = 0;
    }
    m = x->map;
    if (m) {
        x->map = NULL;
        map_put(m);
    }
    if (x->wrap)
        stream_unregister(c, x);
    settled(c, x);
}

/* ---- completions ---------------------------------------------------------------------------- */

static int retryable(int32_t res)
{
    return res == -ECANCELED || res == -EINTR || res == -ERESTARTSYS || res == -EAGAIN;
}

static void let_go(struct us_core *c, struct xfer *x, struct op *op)
{
    if (op->buf >= 0)
        buffer_let_go(c, op->buf);
    if (op->role == R_SEND && x->mem && !x->wrap && op->opcode == IORING_OP_SEND_ZC) {
        c->st.zc_bytes_unreleased -= zc_charge(op->len);
        wake_waiters(c, W_BUDGET);
    }
    if (op->role == R_SEND && x->map) {
        if (op->opcode == IORING_OP_SEND_ZC) {
            c->st.zc_bytes_unreleased -= zc_charge(op->len);
            wake_waiters(c, W_BUDGET);
        }
        if (x->map->large) {  /* keep RSS to what is in flight: drop the whole pages released */
            uint64_t a = ((uint64_t)op->offset + PAGE - 1) / PAGE * PAGE;
            uint64_t b = ((uint64_t)op->offset + op->len) / PAGE * PAGE;
            if (b > a)
                madvise((void *)(uintptr_t)(x->map->addr + a), b - a, MADV_DONTNEED);
        }
    }
}

static void op_over(struct us_core *c, uint32_t i)
{
    struct op *op = &c->ops[i];
    struct xfer *x = op->x;
    if (op->role == R_UNSLOT) {
        /* The slots are empty now (or the op never ran): either way they may be reused. */
        if (x) {
            if (op->res != -ECANCELED) {  /* cancelled: a broken chain; the slots stay held */
                slot_put(c, x->sock);
                if (op->len == 2)
                    slot_put(c, x->file);
            }
        } else {
            slot_put(c, (int)op->offset);
        }
    }
    if (x) {
        let_go(c, x, op);
        x->outstanding--;
    }
    op_free(c, i);
    if (x && x->pub.done)
        maybe_settle(c, x);
}

static void send_error(struct us_core *c, struct xfer *x, struct op *op, int32_t res)
{
    int zc = op->opcode == IORING_OP_SEND_ZC;
    if (res == -EOPNOTSUPP && zc) {  /* e.g. AF_UNIX: no SEND_ZC there [KF 11] */
        x->zc = 0;
        x->pub.fallback = US_FALLBACK_NO_SEND_ZC;
        if (x->map || x->mem)
            x->chunk = c->copy_chunk_size;
        return;
    }
    if (res == -EFAULT && x->map) {
        struct stat st;
        if (fstat(x->map->fd, &st) == 0 && st.st_size < x->pub.end) {
            /* truncated under the mapping: the rest of the file is gone */
            x->pub.end = x->pos > st.st_size ? x->pos : st.st_size;
            if (x->pos > st.st_size && !x->pub.error) {
                x->pub.error = EFAULT;
                x->pub.err_kind = US_ERR_TRUNCATED;
                x->pub.err_size = st.st_size;
            }
            return;
        }
    }
    if (res == -ENOMEM && zc && (x->map || (x->mem && !x->wrap))) {
        if (!x->pub.error) {
            x->pub.error = ENOMEM;
            x->pub.err_kind = US_ERR_MEMLOCK;
        }
        return;
    }
    fail(x, res, op->opcode == IORING_OP_SPLICE ? IORING_OP_SPLICE : op->opcode, 0);
}

static void sent(struct us_core *c, struct xfer *x, struct op *op, int32_t n)
{
    int64_t offset = -1;
    if (op->role == R_HEADER) {
        x->pub.header_sent += (uint32_t)n;
    } else if (op->role == R_TRAILER) {
        x->pub.trailer_sent += (uint32_t)n;
    } else {
        x->pos = op->offset + n;
        x->pub.sent += (uint32_t)n;
        offset = op->offset;
    }
    if (!n)
        return;
    if (op->opcode == IORING_OP_SPLICE) {
        event(c, x, US_QUEUED, offset, (uint32_t)n, -1);
    } else {
        event(c, x, US_SENT, offset, (uint32_t)n, -1);
        if (op->opcode == IORING_OP_SEND)  /* a copying send is done with the memory */
            event(c, x, US_RELEASED, offset, (uint32_t)n, 1);
    }
}

static void issue_cancels(struct us_core *c, struct xfer *x);

static void chain_over(struct us_core *c, struct xfer *x)
{
    if (x->pipe && x->broke) {
        int n = pipe_pending(x->pipe);
        if (n > 0)
            x->pub.stranded += pipe_drain(x->pipe);  /* resent from the file */
    }
    if (x->mark_pos == x->pos && x->mark_header == extra_sent(x) &&
        (x->pos < x->pub.end || trailer_left(x)) && !x->poll_first)
        x->stalls++;
    else
        x->stalls = 0;
    x->chain_len = 0;
    ready(c, x);
}

static void on_result(struct us_core *c, uint32_t i, int32_t res, uint32_t flags)
{
    struct op *op = &c->ops[i];
    struct xfer *x = op->x;
    int zc = op->opcode == IORING_OP_SEND_ZC;
    int in_chain = op->in_chain;

    c->st.completions++;
    c->st.ops_in_flight--;
    op->res = res;
    if (zc && ((flags & IORING_CQE_F_MORE) || res == -ECANCELED)) {
        /* a notification follows, also for a send cancelled by a broken link [KF 11, 12] */
        op->state = OP_NOTIF;
        c->st.pending_notifs++;
    }
    if (!x) {
        if (op->state != OP_NOTIF)
            op_over(c, i);
        return;
    }
    if (x->tee) {
        tee_on_result(c, i, res);
        return;
    }
    if (res < 0 && op->role != R_CANCEL)
        x->last_res = res;
    switch (op->role) {
    case R_HEADER:
    case R_TRAILER:
    case R_SEND:
        if (res >= 0) {
            sent(c, x, op, res);
            if ((uint32_t)res < op->len)
                x->broke = 1;
        } else {
            x->broke = 1;
            if (res == -EAGAIN)
                x->poll_first = 1;  /* O_NONBLOCK socket under splice: wait for POLLOUT [KF 6] */
            else if (!retryable(res))
                send_error(c, x, op, res);
        }
        break;
    case R_FILL:
        if (res >= 0 && (uint32_t)res < op->len) {
            /* a regular file reads short only at its end: the file ended early */
            if (op->offset + res < x->pub.end)
                x->pub.end = op->offset + res;
            x->broke = 1;
        } else if (res < 0) {
            x->broke = 1;
            if (!retryable(res))
                fail(x, res, op->opcode, 1);
        }
        break;
    case R_INSTALL:
        if (res < 0)
            fail(x, res, IORING_OP_FILES_UPDATE, op->offset == 1);
        break;
    case R_POLL:
        if (res < 0 && !retryable(res))
            fail(x, res, IORING_OP_POLL_ADD, 0);
        break;
    case R_UNSLOT:
        if (res != -ECANCELED) {
            x->sock_held = 0;
            if (op->len == 2)
                x->file_held = 0;
        }
        break;
    case R_CANCEL:
        x->cancel_left--;
        if (res != -ENOENT)
            x->cancel_found = 1;
        break;
    }
    if (op->state != OP_NOTIF) {
        int role = op->role;
        op_over(c, i);
        if (role == R_CANCEL) {
            /* A cancel finds only an op the kernel has issued; a round that found nothing while
             * the chain is still out is repeated [KF 24]. */
            if (!x->cancel_left && !x->cancel_found && x->chain_left)
                issue_cancels(c, x);
            return;
        }
    }
    if (in_chain && --x->chain_left == 0) {
        chain_over(c, x);
        return;
    }
    /* A member of a cancelled transfer's chain completed and the link goes on: the next member
     * is issued only now, after the last round looked (a splice that finished despite the cancel
     * hands over to one that blocks on a full socket). Look again [KF 24]. */
    if (in_chain && res >= 0 && x->cancelled && !x->cancel_left)
        issue_cancels(c, x);
}

static void on_notif(struct us_core *c, uint32_t i, int32_t res)
{
    struct op *op = &c->ops[i];
    struct xfer *x = op->x;
    int copied = -1;
    c->st.pending_notifs--;
    c->st.notifs++;
    if (op->report) {
        /* res is a flag word here, never an errno [KF 15] */
        copied = (res & (int32_t)IORING_NOTIF_USAGE_ZC_COPIED) ? 1 : 0;
        if (op->res > 0)  /* a send that moved nothing reads "copied" too: not counted */
            copied ? c->st.copied++ : c->st.zerocopy++;
    }
    if (x && op->res > 0) {
        if (x->mem)
            mem_notified(x, copied);
        event(c, x, US_RELEASED, op->role == R_SEND ? op->offset : -1, (uint32_t)op->res, copied);
    }
    op_over(c, i);
}

static void raw_cqe(struct us_core *c, uint64_t user_data, int32_t res, uint32_t flags)
{
    struct us_change *ch;
    if (c->raw_n == c->raw_cap) {
        unsigned cap = c->raw_cap ? c->raw_cap * 2 : 64;
        struct us_change *q = realloc(c->raw_q, cap * sizeof(*q));
        if (!q)
            return;
        c->raw_q = q;
        c->raw_cap = cap;
    }
    ch = &c->raw_q[c->raw_n++];
    ch->id = user_data;
    ch->res = res;
    ch->flags = flags;
    ch->what = US_CH_RAW;
}

static void handle_cqe(struct us_core *c, uint64_t user_data, int32_t res, uint32_t flags)
{
    uint32_t i = (uint32_t)user_data;
    struct op *op = i && i < c->nops ? &c->ops[i] : NULL;
    if (c->tracing && c->trace_n < c->trace_cap) {
        struct us_trace *t = &c->trace[c->trace_n++];
        t->t_ns = c->now;
        t->user_data = user_data;
        t->res = res;
        t->flags = flags;
        t->xfer_id = op && op->state != OP_FREE && op->x ? op->x->pub.id : 0;
        t->len = op ? op->len : 0;
        t->offset = op ? op->offset : -1;
        t->opcode = op ? op->opcode : 0;
        t->role = op ? op->role : 0;
    }
    if (!op || op->gen != (uint32_t)(user_data >> 32) || op->state == OP_FREE) {
        c->st.orphan_cqes++;
        return;
    }
    if (op->role == R_RAW) {
        if (flags & IORING_CQE_F_NOTIF) {
            c->st.pending_notifs--;
            c->st.notifs++;
            c->st.raw_in_flight--;
            op_free(c, i);
        } else {
            c->st.completions++;
            c->st.ops_in_flight--;
            if ((op->opcode == IORING_OP_SEND_ZC) && ((flags & IORING_CQE_F_MORE) || res == -ECANCELED)) {
                op->state = OP_NOTIF;
                c->st.pending_notifs++;
            } else {
                c->st.raw_in_flight--;
                op_free(c, i);
            }
        }
        raw_cqe(c, user_data, res, flags);
        return;
    }
    if (flags & IORING_CQE_F_NOTIF) {
        if (op->state != OP_NOTIF) {
            c->st.orphan_cqes++;
            return;
        }
        on_notif(c, i, res);
    } else {
        if (op->state != OP_RESULT) {
            c->st.orphan_cqes++;
            return;
        }
        on_result(c, i, res, flags);
    }
}

/* Handle every CQE visible now; returns how many. */
static unsigned reap_visible(struct us_core *c)
{
    struct io_uring_cqe *cqe;
    unsigned head, count = 0, total = 0;
    do {
        count = 0;
        c->now = now_ns();
        io_uring_for_each_cqe(&c->ring, head, cqe) {
            uint64_t ud = cqe->user_data;
            int32_t res = cqe->res;
            uint32_t flags = cqe->flags;
            /* consume before handling: handling may prepare SQEs, never re-read the CQ */
            io_uring_cq_advance(&c->ring, 1);
            handle_cqe(c, ud, res, flags);
            count++;
        }
        total += count;
    } while (count);
    return total;
}

static void issue_cancels(struct us_core *c, struct xfer *x)
{
    unsigned k;
    x->cancel_found = 0;
    for (k = 0; k < x->chain_len; k++) {
        uint64_t target = x->chain[k];
        struct op *op = &c->ops[(uint32_t)target];
        struct io_uring_sqe *sqe;
        uint32_t i;
        if (op->gen != (uint32_t)(target >> 32) || op->state != OP_RESULT || op->role == R_UNSLOT)
            continue;
        if (!room(c, 1))
            break;
        i = op_new(c, x, IORING_OP_ASYNC_CANCEL, R_CANCEL);
        if (!i)
            break;
        sqe = sqe_for(c, x, i, 0);
        io_uring_prep_cancel64(sqe, target, 0);
        x->cancel_left++;
    }
}

/* ---- public entry points -------------------------------------------------------------------- */

struct us_core *us_core_new(unsigned entries, unsigned flags, unsigned cq_entries, unsigned file_slots,
                            int *err)
{
    struct io_uring_params p;
    struct us_core *c = calloc(1, sizeof(*c));
    unsigned i;
    int ret;
    if (!c) {
        *err = -ENOMEM;
        return NULL;
    }
    memset(&p, 0, sizeof(p));
    p.flags = flags;
    if (cq_entries) {
        p.flags |= IORING_SETUP_CQSIZE;
        p.cq_entries = cq_entries;
    }
    ret = io_uring_queue_init_params(entries, &c->ring, &p);
    if (ret < 0) {
        free(c);
        *err = ret;
        return NULL;
    }
    c->flags = (int)flags;
    c->sq_entries = c->ring.sq.ring_entries;
    c->chunk_size = 1u << 20;
    c->copy_chunk_size = 1u << 20;
    c->zc_budget = 16u << 20;
    c->pipe_size = 1u << 20;
    c->max_idle_pipes = 16;
    c->keep_maps = 64;
    c->large_map = 16u << 20;
    c->next_id = 1;
    if (file_slots && io_uring_register_files_sparse(&c->ring, file_slots) == 0) {
        c->free_slots = malloc(file_slots * sizeof(int32_t));
        if (c->free_slots) {
            for (i = 0; i < file_slots; i++)
                c->free_slots[i] = (int32_t)(file_slots - 1 - i);  /* slot 0 handed out first */
            c->nslots = c->nfree_slots = file_slots;
            c->st.fixed_files = file_slots;
        }
    }
    *err = 0;
    return c;
}

int us_core_flags(struct us_core *c) { return c->flags; }
int us_core_fd(struct us_core *c) { return c->ring.ring_fd; }
unsigned us_core_sq_entries(struct us_core *c) { return c->sq_entries; }
unsigned us_core_cq_entries(struct us_core *c) { return c->ring.cq.ring_entries; }
struct us_stats *us_core_stats(struct us_core *c) { return &c->st; }
struct us_change *us_core_changes(struct us_core *c) { return c->changes; }

void us_core_configure(struct us_core *c, uint32_t chunk_size, uint32_t copy_chunk_size,
                       uint64_t zc_budget, uint32_t pipe_size, uint32_t max_idle_pipes,
                       uint32_t keep_maps, uint64_t large_map)
{
    c->keep_maps = keep_maps;
    c->large_map = large_map;
    c->chunk_size = chunk_size;
    c->copy_chunk_size = copy_chunk_size;
    c->zc_budget = zc_budget;
    c->pipe_size = pipe_size;
    c->max_idle_pipes = max_idle_pipes;
}

int us_core_set_trace(struct us_core *c, int on)
{
    if (on && !c->trace) {
        c->trace_cap = 1u << 20;
        c->trace = malloc(c->trace_cap * sizeof(*c->trace));
        if (!c->trace)
            return -ENOMEM;
    }
    c->tracing = on;
    return 0;
}

unsigned us_core_trace(struct us_core *c, struct us_trace **out)
{
    *out = c->trace;
    return c->trace_n;
}

int us_core_register_eventfd(struct us_core *c, int fd)
{
    return io_uring_register_eventfd(&c->ring, fd);
}

int us_core_iowq_max_workers(struct us_core *c, unsigned bounded, unsigned unbounded)
{
    unsigned values[2] = {bounded, unbounded};
    return io_uring_register_iowq_max_workers(&c->ring, values);
}

/* The registered buffer pool of mode 'zerocopy': count page-aligned buffers of size bytes. */
int us_core_pool(struct us_core *c, uint32_t count, uint32_t size)
{
    struct pool *pool = &c->pool;
    struct iovec *iov;
    uint32_t i;
    int ret;
    if (pool->base)
        return 0;
    if (!count || size < PAGE || size % PAGE)
        return -EINVAL;
    pool->base = mmap(NULL, (size_t)count * size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (pool->base == MAP_FAILED) {
        pool->base = NULL;
        return -errno;
    }
    iov = calloc(count, sizeof(*iov));
    pool->free_stack = malloc(count * sizeof(uint32_t));
    pool->refs = calloc(count, 1);
    if (!iov || !pool->free_stack || !pool->refs) {
        ret = -ENOMEM;
        goto fail;
    }
    for (i = 0; i < count; i++) {
        iov[i].iov_base = pool->base + (size_t)i * size;
        iov[i].iov_len = size;
        pool->free_stack[i] = count - 1 - i;
    }
    /* in the first slots of a sparse table, leaving the last ones to stream buffers; a kernel
     * without sparse tables (< 5.19) gets the pool alone */
    if (c->buf_table || buf_table(c, count + STREAM_SLOTS) == 0)
        ret = count <= c->buf_table - STREAM_SLOTS ? buf_update(c, 0, iov, count) : -ENOSPC;
    else
        ret = io_uring_register_buffers(&c->ring, iov, count);
    free(iov);
    iov = NULL;
    if (ret < 0)
        goto fail;
    pool->count = pool->nfree = count;
    pool->size = size;
    c->st.buffers_total = c->st.buffers_free = count;
    return 0;
fail:
    free(iov);
    free(pool->free_stack);
    free(pool->refs);
    munmap(pool->base, (size_t)count * size);
    memset(pool, 0, sizeof(*pool));
    return ret;
}

uint64_t us_core_pool_address(struct us_core *c, uint32_t index)
{
    return c->pool.base && index < c->pool.count ? (uint64_t)(uintptr_t)(c->pool.base + (size_t)index * c->pool.size) : 0;
}

/* Bytes sitting in the idle pooled pipes (always 0: a pipe that cannot be emptied is closed). */
uint64_t us_core_idle_pipe_bytes(struct us_core *c)
{
    struct pipe *p;
    uint64_t total = 0;
    for (p = c->idle_pipes; p; p = p->next) {
        int n = pipe_pending(p);
        total += n > 0 ? (uint64_t)n : 0;
    }
    return total;
}

/* Changes (watched transfers, raw CQEs) that wait for the next us_run to hand them out. */
unsigned us_core_changes_pending(struct us_core *c)
{
    return (c->change_head ? 1 : 0) + (c->raw_n - c->raw_head);
}

/* Work left: operations the kernel still owes a CQE for (transfers' or raw), and transfers ready
 * to be advanced by the next us_run. 0: nothing can change without a new transfer. */
unsigned us_core_busy(struct us_core *c)
{
    return (unsigned)(c->st.ops_in_flight + c->st.pending_notifs) + (c->ready_head ? 1 : 0);
}

static int dup_fd(int fd)
{
    return fcntl(fd, F_DUPFD_CLOEXEC, 0);
}

static struct us_xfer *start_failed(struct us_core *c, int why, int err)
{
    c->start_error = why;
    errno = err;
    return NULL;
}

/* Chunks of a send from memory or a mapping: with SEND_ZC (zc), one send's pinned pages must fit
 * the budget by themselves; a chain carries at most CHAIN_BYTES. */
static void size_chunks(struct us_core *c, struct xfer *x, int zc)
{
    if (zc) {
        uint64_t max = c->zc_budget >> 12 > 2 ? ((c->zc_budget >> 12) - 2) << 12 : PAGE;
        if (x->chunk > max)
            x->chunk = (uint32_t)(max < PAGE ? PAGE : max);
    }
    if (CHAIN_BYTES / x->chunk < x->window)
        x->window = CHAIN_BYTES / x->chunk ? CHAIN_BYTES / x->chunk : 1;
}

/* A chain (fixed ops plus per ops a chunk) must fit the SQ: it is never split [KF 4]. */
static void fit_sq(struct us_core *c, struct xfer *x, unsigned per, unsigned fixed)
{
    if (c->sq_entries > fixed + per) {
        unsigned w = (c->sq_entries - fixed) / per;
        if (w < x->window)
            x->window = w;
    } else {
        x->window = 1;
    }
}

/* Hold the socket (and the file: uses_file) in the registered file table, or as duplicates when
 * the table is full: the caller may close theirs as soon as the start call returns. */
static void hold_fds(struct us_core *c, struct xfer *x, int sock_fd, int file_fd, int uses_file)
{
    /* The FILES_UPDATE runs inline in launch()'s submission [KF 28]. */
    if (c->nfree_slots >= (unsigned)(1 + uses_file) && room(c, 2)) {
        int a = slot_get(c), b = -1;
        if (uses_file) {
            b = slot_get(c);
            if (b != a + 1) {  /* keep the pair adjacent when we can: one FILES_UPDATE empties both */
                if (b == a - 1) {
                    int t = a;
                    a = b;
                    b = t;
                }
            }
        }
        x->sock = a;
        x->sock_fixed = x->sock_held = 1;
        x->install_fd[0] = sock_fd;
        x->install_fd[1] = file_fd;
        if (uses_file) {
            x->file = b;
            x->file_fixed = x->file_held = 1;
        }
        {
            struct io_uring_sqe *sqe;
            uint32_t i = op_new(c, x, IORING_OP_FILES_UPDATE, R_INSTALL);
            if (!i) {
                fail(x, -ENOMEM, IORING_OP_FILES_UPDATE, 0);
                return;
            }
            sqe = sqe_for(c, x, i, 0);
            if (uses_file && b == a + 1) {
                io_uring_prep_files_update(sqe, x->install_fd, 2, a);
            } else {
                io_uring_prep_files_update(sqe, x->install_fd, 1, a);
                if (uses_file) {
                    i = op_new(c, x, IORING_OP_FILES_UPDATE, R_INSTALL);
                    if (!i) {
                        fail(x, -ENOMEM, IORING_OP_FILES_UPDATE, 1);
                        return;
                    }
                    c->ops[i].offset = 1;  /* names the file in an error */
                    sqe = sqe_for(c, x, i, 0);
                    io_uring_prep_files_update(sqe, x->install_fd + 1, 1, b);
                }
            }
        }
    } else {
        x->sock = dup_fd(sock_fd);
        if (x->sock < 0) {
            fail(x, -errno, US_OP_DUP, 0);
        } else {
            x->sock_held = 1;
            if (uses_file) {
                x->file = dup_fd(file_fd);
                if (x->file < 0)
                    fail(x, -errno, US_OP_DUP, 1);
                else
                    x->file_held = 1;
            }
        }
        c->st.fds_duplicated++;
    }
}

/* Build and submit the first chain of a transfer just started. A small send completes inline:
 * its CQEs are handled now, so that waiting costs nothing more. */
static struct us_xfer *launch(struct us_core *c, struct xfer *x)
{
    x->starting = 1;
    pump(c, x);
    if (c->urgent)
        submit(c);
    if (io_uring_cq_ready(&c->ring))
        reap_visible(c);
    pump_ready(c);
    if (c->urgent)
        submit(c);  /* e.g. emptying the slots of a transfer that just ended */
    x->starting = 0;
    return &x->pub;
}

struct us_xfer *us_start(struct us_core *c, int mode, int sock_fd, int file_fd, int64_t offset,
                         int64_t count, const char *extra, uint32_t header_len, uint32_t trailer_len,
                         int notify)
{
    struct xfer *x;
    struct stat st;
    struct us_map *map = NULL;
    int uses_file = mode == US_MODE_SPLICE || mode == US_MODE_ZEROCOPY;
    int64_t end;
    int empty;

    if (c->closed)
        return start_failed(c, US_START_CLOSED, EBADF);
    if (mode == US_MODE_ZEROCOPY && !c->pool.base)
        return start_failed(c, US_START_NO_POOL, EINVAL);
    if (fstat(file_fd, &st) < 0)
        return start_failed(c, US_START_FSTAT, errno);
    if (!S_ISREG(st.st_mode))
        return start_failed(c, S_ISDIR(st.st_mode) ? US_START_DIR : US_START_NOT_REGULAR,
                            S_ISDIR(st.st_mode) ? EISDIR : EINVAL);
    if (offset > st.st_size) {
        c->start_size = st.st_size;
        return start_failed(c, US_START_OFFSET, EINVAL);
    }
    end = count < 0 || count > st.st_size - offset ? st.st_size : offset + count;
    empty = end <= offset && !header_len && !trailer_len;
    if ((mode == US_MODE_MMAP || mode == US_MODE_COPY) && end > offset) {
        int err = 0;
        map = map_get(c, file_fd, &st, &err);
        if (!map)
            return start_failed(c, US_START_MAP, -err);
    }
    x = calloc(1, sizeof(*x) + header_len + trailer_len);
    if (!x) {
        if (map && !map->users && map->large)
            map_free(map);
        return start_failed(c, US_START_OTHER, ENOMEM);
    }
    x->core = c;
    x->refs = 2;
    x->pub.id = c->next_id++;
    x->pub.offset = offset;
    x->pub.end = end;
    x->pub.planned = end - offset;
    x->pub.mode = (uint8_t)mode;
    x->pub.notify = (uint8_t)notify;
    x->pub.events = x->inline_events;
    x->cap_events = EVENTS_INLINE;
    x->pub.started_ns = now_ns();
    x->pos = offset;
    x->header = (uint8_t *)(x + 1);
    memcpy(x->header, extra, header_len + trailer_len);  /* the header, then the trailer */
    x->header_len = x->pub.header_len = header_len;
    x->trailer_len = x->pub.trailer_len = trailer_len;
    x->sock = x->file = -1;
    x->uses_file = (uint8_t)uses_file;
    x->zc = mode == US_MODE_ZEROCOPY || mode == US_MODE_MMAP;
    x->window = WINDOW;
    if (mode == US_MODE_MMAP || mode == US_MODE_COPY) {
        x->chunk = mode == US_MODE_MMAP ? c->chunk_size : c->copy_chunk_size;
        size_chunks(c, x, mode == US_MODE_MMAP);
        if (map) {
            x->map = map;
            map->users++;
        }
    }
    fit_sq(c, x, uses_file ? 2 : 1, 5);  /* install, poll, header, chunks, trailer, unslot */
    activate(c, x);

    if (empty) {
        mark_done(c, x);
        maybe_settle(c, x);
        return &x->pub;
    }
    hold_fds(c, x, sock_fd, file_fd, uses_file);
    return launch(c, x);
}

/* A transfer from memory at addr: offsets are bytes from addr (or stream offsets). */
static struct xfer *mem_xfer_new(struct us_core *c, int mode, uint64_t addr, uint64_t len, int notify)
{
    struct xfer *x = calloc(1, sizeof(*x));
    if (!x)
        return NULL;
    x->core = c;
    x->refs = 2;
    x->pub.id = c->next_id++;
    x->pub.end = (int64_t)len;
    x->pub.planned = (int64_t)len;
    x->pub.mode = (uint8_t)mode;
    x->pub.notify = (uint8_t)notify;
    x->pub.events = x->inline_events;
    x->cap_events = EVENTS_INLINE;
    x->pub.started_ns = now_ns();
    x->header = (uint8_t *)(x + 1);
    x->sock = x->file = -1;
    x->mem = (uint8_t *)(uintptr_t)addr;
    x->zc = mode == US_MODE_MMAP || mode == US_MODE_AUTO;
    x->copy_when_copied = mode == US_MODE_AUTO;
    x->chunk = x->zc ? c->chunk_size : c->copy_chunk_size;
    x->window = WINDOW;
    return x;
}

/* Take hold of the socket (a registered file slot, else a duplicate) and send what there is. */
static struct us_xfer *mem_launch(struct us_core *c, struct xfer *x, int sock_fd)
{
    size_chunks(c, x, x->zc && !x->wrap);
    fit_sq(c, x, 1, 4);  /* install, chunks, unslot */
    activate(c, x);
    if (!x->open && x->pub.end <= 0) {
        mark_done(c, x);
        maybe_settle(c, x);
        return &x->pub;
    }
    hold_fds(c, x, sock_fd, -1, 0);
    return launch(c, x);
}

struct us_xfer *us_send(struct us_core *c, int mode, int sock_fd, uint64_t addr, uint64_t len, int notify)
{
    struct xfer *x;
    if (c->closed)
        return start_failed(c, US_START_CLOSED, EBADF);
    x = mem_xfer_new(c, mode, addr, len, notify);
    if (!x)
        return start_failed(c, US_START_OTHER, ENOMEM);
    return mem_launch(c, x, sock_fd);
}

struct us_xfer *us_stream(struct us_core *c, int mode, int sock_fd, uint64_t addr, uint64_t size, int notify)
{
    struct iovec iov = {(void *)(uintptr_t)addr, (size_t)size};
    struct xfer *x;
    unsigned bit;
    int ret;
    if (c->closed)
        return start_failed(c, US_START_CLOSED, EBADF);
    ret = buf_table(c, BUF_TABLE);
    if (ret < 0)
        return start_failed(c, US_START_REGISTER, -ret);
    for (bit = 0; bit < STREAM_SLOTS && (c->stream_slots >> bit) & 1; bit++)
        ;
    if (bit == STREAM_SLOTS)
        return start_failed(c, US_START_NO_SLOT, ENOSPC);
    x = mem_xfer_new(c, mode, addr, 0, notify);
    if (!x)
        return start_failed(c, US_START_OTHER, ENOMEM);
    x->buf_index = (uint16_t)(c->buf_table - STREAM_SLOTS + bit);
    ret = buf_update(c, x->buf_index, &iov, 1);
    if (ret < 0) {
        xfer_free(x);
        return start_failed(c, US_START_REGISTER, -ret);
    }
    c->stream_slots |= 1ull << bit;
    x->wrap = size;
    x->open = 1;
    /* releases come per send: several sends per lap keep the buffer reusable a part at a time */
    if (x->chunk > size / 8)
        x->chunk = size / 8 > PAGE ? (uint32_t)(size / 8) : PAGE;
    return mem_launch(c, x, sock_fd);
}

/* The next n bytes of the stream are in its buffer: send them. Returns 0 when they went into a
 * chain at once, 1 when they wait for the chain in flight (the next us_run sends them), or the
 * transfer's -errno once it ended. */
int us_stream_commit(struct us_core *c, struct us_xfer *pub, uint64_t n)
{
    struct xfer *x = (struct xfer *)pub;
    if (c->closed)
        return -EBADF;
    if (x->pub.done || !x->open)
        return x->pub.error ? -x->pub.error : -EPIPE;
    x->pub.end += (int64_t)n;
    x->pub.planned += (int64_t)n;
    if (x->chain_left || x->in_ready)
        return 1;
    pump(c, x);
    if (c->urgent)
        submit(c);
    return 0;
}

/* Nothing more will be committed: the transfer ends once what was committed is sent. */
void us_stream_end(struct us_core *c, struct us_xfer *pub)
{
    struct xfer *x = (struct xfer *)pub;
    if (!x->open)
        return;
    x->open = 0;
    if (c->closed || x->chain_left || x->pub.done)
        return;
    pump(c, x);
    if (c->urgent)
        submit(c);
}

void us_cancel(struct us_core *c, struct us_xfer *pub)
{
    struct xfer *x = (struct xfer *)pub;
    if (x->pub.done || x->cancelled)
        return;
    if (x->tee) {
        tee_cancel_dest(c, x);
        return;
    }
    x->cancelled = 1;
    if (x->waiting) {  /* starved: nothing in flight; take it off the waiters */
        struct xfer **pp = &c->wait_head;
        while (*pp && *pp != x)
            pp = &(*pp)->next_wait;
        if (*pp)
            *pp = x->next_wait;
        x->waiting = W_NONE;
    }
    if (x->chain_left) {
        if (!x->cancel_left)
            issue_cancels(c, x);
    } else {
        ready(c, x);
    }
}

void us_cancel_all(struct us_core *c)
{
    struct xfer *x;
    for (x = c->active; x; x = x->next_active)
        us_cancel(c, &x->pub);
}

/*
 * Submit what is ready, handle the CQEs that are in (waiting up to timeout_ns, <0 without limit,
 * for at least wait_nr when none is), advance every transfer. Returns the number of entries in
 * us_core_changes(), or -errno (-EINTR: a signal arrived; call again). A timeout returns 0.
 */
int us_run(struct us_core *c, unsigned wait_nr, int64_t timeout_ns, int ack)
{
    unsigned handled = 0, rounds = 0;
    int entered = 0, more = 0, ret = 0;

    if (c->closed)
        return -EBADF;
    for (;;) {
        unsigned n;
        if (++rounds > 64)
            break;  /* bounded: the caller calls again */
        pump_ready(c);
        if (c->urgent || (io_uring_sq_ready(&c->ring) && !io_uring_sq_space_left(&c->ring))) {
            ret = submit(c);
            entered = 1;
            if (ret < 0)
                break;
        }
        n = reap_visible(c);
        handled += n;
        if (n && entered)
            more = 1;  /* an enter brought CQEs: deferred task work may hold more [KF 23] */
        if (n || c->urgent || c->ready_head)
            continue;
        if (IO_URING_READ_ONCE(*c->ring.sq.kflags) & IORING_SQ_CQ_OVERFLOW) {
            c->st.enters++;
            io_uring_get_events(&c->ring);  /* overflowed CQEs stay invisible until then [KF 20] */
            entered = 1;
            continue;
        }
        if (wait_nr && (handled || c->change_head || c->raw_n))
            break;  /* the caller looks at what changed before waiting any longer */
        if (wait_nr && !us_core_busy(c) && !io_uring_sq_ready(&c->ring))
            break;  /* nothing can complete: the caller's wait cannot end */
        if (wait_nr) {
            struct io_uring_cqe *cqe;
            struct __kernel_timespec ts, *tsp = NULL;
            if (timeout_ns >= 0) {
                ts.tv_sec = timeout_ns / 1000000000LL;
                ts.tv_nsec = timeout_ns % 1000000000LL;
                tsp = &ts;
            }
            c->st.enters++;
            /* lazily prepared SQEs go with the wait */
            ret = io_uring_submit_and_wait_timeout(&c->ring, &cqe, wait_nr, tsp, NULL);
            c->urgent = 0;
            wait_nr = 0;
            entered = 1;
            more = 0;
            if (ret < 0 && ret != -ETIME)
                break;  /* -EINTR: a signal; the caller's handler runs, then it calls again */
            ret = 0;
            continue;
        }
        if (!entered || more) {
            /* Nothing (more) visible: with DEFER_TASKRUN completions and the next link members
             * wait in task work that only an enter with GETEVENTS runs [KF 22], and one that does
             * not wait runs a bounded number of items: enter until one brings nothing. */
            c->st.enters++;
            ret = io_uring_submit_and_get_events(&c->ring);
            c->urgent = 0;
            entered = 1;
            more = 0;
            if (ret < 0 && ret != -EAGAIN && ret != -EBUSY && ret != -EINTR)
                break;
            ret = 0;
            continue;
        }
        break;
    }
    if (c->urgent && ret >= 0)
        submit(c);  /* a transfer that ended has its slots emptied before the caller sees it done */
    /* Hand out the batch. Without ack the caller did not get to handle the last one (a signal
     * handler raised between this call and its dispatch): it is handed out again, first. */
    if (ack)
        c->nchanges = 0;
    while (c->nchanges < CHANGES_MAX && c->raw_head < c->raw_n)
        c->changes[c->nchanges++] = c->raw_q[c->raw_head++];
    if (c->raw_head == c->raw_n)
        c->raw_head = c->raw_n = 0;
    while (c->nchanges < CHANGES_MAX && c->change_head) {
        struct xfer *x = c->change_head;
        struct us_change *ch = &c->changes[c->nchanges++];
        c->change_head = x->next_change;
        if (!c->change_head)
            c->change_tail = NULL;
        ch->id = x->pub.id;
        ch->what = x->change_bits;
        ch->res = 0;
        ch->flags = 0;
        x->change_bits = 0;
        x->in_changes = 0;
        if (x->pub.settled && x->core) {
            x->core = NULL;
            xfer_unref(x);
        }
    }
    if (ret < 0 && !c->nchanges)
        return ret;
    return (int)c->nchanges;
}

/* Whole chains of raw ops (runs of IOSQE_IO_LINK / IOSQE_IO_HARDLINK), prepared as given and
 * submitted. Sets each op's user_data. Returns n, or -EINVAL (a chain longer than the SQ or an
 * unknown opcode: nothing of it is prepared), or -ENOMEM. */
int us_raw_submit(struct us_core *c, struct us_rawop *ops, unsigned n)
{
    unsigned done = 0, k;
    if (c->closed)
        return -EBADF;
    /* check every chain before preparing any: a refusal leaves nothing prepared */
    for (k = 0; k < n; k++) {
        switch (ops[k].opcode) {
        case IORING_OP_NOP: case IORING_OP_SPLICE: case IORING_OP_TEE: case IORING_OP_READ_FIXED:
        case IORING_OP_READ: case IORING_OP_SEND: case IORING_OP_SEND_ZC: case US_OP_SEND_ZC_FIXED:
        case IORING_OP_POLL_ADD: case IORING_OP_ASYNC_CANCEL:
            break;
        default:
            return -EINVAL;
        }
    }
    for (k = 0; k < n; k = done) {
        unsigned len = 1;
        done = k;
        while (done + len < n && (ops[done + len - 1].sqe_flags & (IOSQE_IO_LINK | IOSQE_IO_HARDLINK)))
            len++;
        if (len > c->sq_entries)
            return -EINVAL;
        done += len;
    }
    done = 0;
    while (done < n) {
        unsigned len = 1;
        while (done + len < n && (ops[done + len - 1].sqe_flags & (IOSQE_IO_LINK | IOSQE_IO_HARDLINK)))
            len++;
        if (!room(c, len))
            return done ? (int)done : -EBUSY;
        for (k = 0; k < len; k++) {
            struct us_rawop *r = &ops[done + k];
            uint8_t opcode = r->opcode == US_OP_SEND_ZC_FIXED ? IORING_OP_SEND_ZC : r->opcode;
            uint32_t i = op_new(c, NULL, opcode, R_RAW);
            struct io_uring_sqe *sqe;
            void *buf = (void *)(uintptr_t)r->addr;
            if (!i)
                return -ENOMEM;
            c->ops[i].len = r->len;
            sqe = sqe_for(c, NULL, i, 0);
            c->st.raw_in_flight++;
            switch (r->opcode) {
            case IORING_OP_NOP: io_uring_prep_nop(sqe); break;
            case IORING_OP_SPLICE:
                io_uring_prep_splice(sqe, r->fd_in, r->off_in, r->fd, r->off, r->len, r->splice_flags);
                break;
            case IORING_OP_TEE: io_uring_prep_tee(sqe, r->fd_in, r->fd, r->len, r->splice_flags); break;
            case IORING_OP_READ_FIXED:
                io_uring_prep_read_fixed(sqe, r->fd, buf, r->len, (uint64_t)r->off, r->buf_index);
                break;
            case IORING_OP_READ: io_uring_prep_read(sqe, r->fd, buf, r->len, (uint64_t)r->off); break;
            case IORING_OP_SEND: io_uring_prep_send(sqe, r->fd, buf, r->len, (int)r->msg_flags); break;
            case IORING_OP_SEND_ZC:
                io_uring_prep_send_zc(sqe, r->fd, buf, r->len, (int)r->msg_flags, r->zc_flags);
                break;
            case US_OP_SEND_ZC_FIXED:
                io_uring_prep_send_zc_fixed(sqe, r->fd, buf, r->len, (int)r->msg_flags, r->zc_flags,
                                            r->buf_index);
                break;
            case IORING_OP_POLL_ADD: io_uring_prep_poll_add(sqe, r->fd, r->poll_mask); break;
            case IORING_OP_ASYNC_CANCEL: io_uring_prep_cancel64(sqe, r->addr, 0); break;
            }
            sqe->flags |= r->sqe_flags;
            r->user_data = op_user_data(c, i);
        }
        done += len;
    }
    return submit(c) < 0 ? -EIO : (int)n;
}

/* Tear the ring down. Returns how many operations were still out: their memory (the buffer pool,
 * mappings, header bytes, pipes) is kept for the life of the process, never freed or reused. */
int us_core_close(struct us_core *c)
{
    unsigned busy;
    struct xfer *x, *next;
    if (c->closed)
        return 0;
    c->closed = 1;
    busy = (unsigned)(c->st.ops_in_flight + c->st.pending_notifs);
    io_uring_queue_exit(&c->ring);
    while (c->idle_pipes) {
        struct pipe *p = c->idle_pipes;
        c->idle_pipes = p->next;
        pipe_close(p);
    }
    c->st.pipes_idle = 0;
    maps_close(c);
    for (x = c->active; x; x = next) {
        next = x->next_active;
        /* no request is left to pick up a file by fd: our duplicates can go */
        if (x->sock_held && !x->sock_fixed)
            close(x->sock);
        if (x->tee && x->tee->file_held && !x->tee->file_fixed) {
            close(x->tee->file);
            x->tee->file_held = 0;
        }
        if (x->file_held && !x->file_fixed)
            close(x->file);
        x->sock_held = x->file_held = 0;
        if (x->map && x->map->large)
            map_close_fd(x->map);  /* no truncation check will run any more */
        if (!busy) {
            if (x->pipe)
                pipe_close(x->pipe);
            x->pipe = NULL;
        }
    }
    if (busy) {
        c->st.kept_alive = busy;
        return (int)busy;
    }
    if (c->pool.base) {
        munmap(c->pool.base, (size_t)c->pool.count * c->pool.size);
        free(c->pool.free_stack);
        free(c->pool.refs);
        memset(&c->pool, 0, sizeof(c->pool));
    }
    return 0;
}

/* Free the core's memory once closed. Transfers still referenced by Python keep their own memory;
 * with operations kept alive at close, the core and everything reachable from it stays. */
void us_core_free(struct us_core *c)
{
    struct xfer *x, *next;
    if (!c->closed)
        us_core_close(c);
    if (c->st.kept_alive)
        return;
    for (x = c->change_head; x; x = next) {
        next = x->next_change;
        x->in_changes = 0;
        if (x->pub.settled && x->core) {
            x->core = NULL;
            xfer_unref(x);
        }
    }
    for (x = c->active; x; x = next) {
        next = x->next_active;
        if (x->map) {
            map_put(x->map);
            x->map = NULL;
        }
        x->core = NULL;
        xfer_unref(x);
    }
    maps_close(c);
    free(c->maps);
    free(c->ops);
    free(c->free_slots);
    free(c->raw_q);
    free(c->trace);
    free(c);
}

/* ---- tee: one file to many sockets ------------------------------------------------------------ */

static int tee_live(struct xfer *x)
{
    return !x->pub.done && !x->cancelled && !x->pub.error;
}

static void tee_finish(struct us_core *c, struct tee *t, struct xfer *x)
{
    if (x->pub.done)
        return;
    if (x->cancelled && !x->pub.error && x->pos < t->end) {
        x->pub.error = ECANCELED;
        x->pub.err_kind = US_ERR_CANCELLED;
    }
    if (x->sock_held) {  /* no op will be issued on it any more: a caller's close() closes it */
        if (x->sock_fixed)
            unslot_now(c, x->sock);
        else
            close(x->sock);
        x->sock_held = 0;
    }
    mark_done(c, x);
    change(c, x, US_CH_DONE);
}

static void tee_maybe_settle(struct us_core *c, struct tee *t)
{
    unsigned i;
    if (t->outstanding || t->chain_left)
        return;
    for (i = 0; i < t->n; i++)
        if (!t->dest[i]->pub.done || t->dest[i]->pub.settled)
            return;
    if (t->src) {
        pipe_put(c, t->src);
        t->src = NULL;
    }
    for (i = 0; i < t->n; i++) {
        if (t->pipes[i])
            pipe_put(c, t->pipes[i]);
        t->pipes[i] = NULL;
    }
    if (t->file_held) {
        if (t->file_fixed)
            unslot_now(c, t->file);
        else
            close(t->file);
        t->file_held = 0;
    }
    for (i = 0; i < t->n; i++) {
        t->dest[i]->tee = NULL;  /* the group goes; each transfer now stands alone */
        settled(c, t->dest[i]);
    }
    free(t->dest);
    free(t->pipes);
    free(t->mark);
    free(t->pos);
    free(t->chain);
    free(t);
}

static void tee_pump(struct us_core *c, struct tee *t)
{
    unsigned i, k, live = 0, need;
    uint32_t roomy = UINT32_MAX;
    struct io_uring_sqe *sqe;
    uint32_t fill_flags = t->file_fixed ? SPLICE_F_FD_IN_FIXED : 0;

    if (t->chain_left)
        return;
    for (i = 0; i < t->n; i++) {
        struct xfer *x = t->dest[i];
        if (tee_live(x) && x->pos >= t->end)
            tee_finish(c, t, x);
        if (tee_live(x) && t->stalls >= MAX_STALLS) {
            x->pub.error = x->last_res < 0 ? -x->last_res : EIO;
            x->pub.err_kind = US_ERR_STALL;
        }
        if (!x->pub.done && !tee_live(x))
            tee_finish(c, t, x);  /* cancelled or failed: drops out alone */
        live += !x->pub.done;
    }
    if (!live) {
        tee_maybe_settle(c, t);
        return;
    }
    need = 2 * live * t->window;
    if (need > c->sq_entries)
        need = 2 * live;
    if (!room(c, need)) {
        c->st.sq_full++;
        ready(c, t->dest[0]);
        return;
    }
    roomy = t->src->capacity;
    for (i = 0; i < t->n; i++) {
        t->pos[i] = t->dest[i]->pos;
        if (!t->dest[i]->pub.done && t->pipes[i] && t->pipes[i]->capacity < roomy)
            roomy = t->pipes[i]->capacity;
    }
    t->chain_len = 0;
    for (k = 0; k < t->window && io_uring_sq_space_left(&c->ring) >= 2 * live; k++) {
        int64_t a = INT64_MAX, b;
        unsigned last = t->n, op_i;
        uint32_t n;
        for (i = 0; i < t->n; i++)
            if (!t->dest[i]->pub.done && t->pos[i] < a)
                a = t->pos[i];
        if (a >= t->end)
            break;
        /* [a, b): no further than the pipes hold (page aligned [KF 9]), and never past the next
         * destination's position, so no socket gets a byte twice or misses one */
        b = a + roomy - a % PAGE;
        if (b > t->end)
            b = t->end;
        for (i = 0; i < t->n; i++)
            if (!t->dest[i]->pub.done && t->pos[i] > a && t->pos[i] < b)
                b = t->pos[i];
        n = (uint32_t)(b - a);
        for (i = 0; i < t->n; i++)
            if (!t->dest[i]->pub.done && t->pos[i] == a)
                last = i;
        op_i = op_new(c, t->dest[last], IORING_OP_SPLICE, R_FILL);
        c->ops[op_i].offset = a;
        c->ops[op_i].len = n;
        sqe = sqe_for(c, NULL, op_i, 0);
        t->chain[t->chain_len++] = op_user_data(c, op_i);
        io_uring_prep_splice(sqe, t->file, a, t->src->w, -1, n, fill_flags);
        sqe->flags |= IOSQE_IO_LINK;
        for (i = 0; i < t->n; i++) {  /* a copy of the references for each but the last */
            if (i == last || t->dest[i]->pub.done || t->pos[i] != a)
                continue;
            op_i = op_new(c, t->dest[i], IORING_OP_TEE, R_TEE);
            c->ops[op_i].offset = a;
            c->ops[op_i].len = n;
            sqe = sqe_for(c, NULL, op_i, 0);
            t->chain[t->chain_len++] = op_user_data(c, op_i);
            io_uring_prep_tee(sqe, t->src->r, t->pipes[i]->w, n, 0);
            sqe->flags |= IOSQE_IO_LINK;
        }
        for (i = 0; i < t->n; i++) {
            struct xfer *x = t->dest[i];
            if (x->pub.done || t->pos[i] != a)
                continue;
            op_i = op_new(c, x, IORING_OP_SPLICE, R_SEND);
            c->ops[op_i].offset = a;
            c->ops[op_i].len = n;
            sqe = sqe_for(c, NULL, op_i, 0);
            t->chain[t->chain_len++] = op_user_data(c, op_i);
            io_uring_prep_splice(sqe, i == last ? t->src->r : t->pipes[i]->r, -1, x->sock, -1, n, 0);
            use_sock(sqe, x);
            sqe->flags |= IOSQE_IO_LINK;
            t->pos[i] = b;
        }
    }
    if (!t->chain_len)
        return;
    c->last_sqe->flags &= (uint8_t)~IOSQE_IO_LINK;
    t->chain_left = t->chain_len;
    t->outstanding += t->chain_len;
    for (i = 0; i < t->n; i++)
        t->mark[i] = t->dest[i]->pos;
}

static void tee_chain_over(struct us_core *c, struct tee *t)
{
    unsigned i, moved = 0;
    int n = pipe_pending(t->src);
    if (n > 0)
        t->dest[0]->pub.stranded += pipe_drain(t->src);  /* resent from the file */
    for (i = 0; i < t->n; i++) {
        if (t->pipes[i] && (n = pipe_pending(t->pipes[i])) > 0)
            t->dest[0]->pub.stranded += pipe_drain(t->pipes[i]);
        moved |= t->mark[i] != t->dest[i]->pos;
    }
    t->stalls = moved ? 0 : t->stalls + 1;
    t->chain_len = 0;
    ready(c, t->dest[0]);
}

static void tee_on_result(struct us_core *c, uint32_t i, int32_t res)
{
    struct op *op = &c->ops[i];
    struct xfer *x = op->x;
    struct tee *t = x->tee;
    unsigned k;
    if (res < 0)
        x->last_res = res;
    switch (op->role) {
    case R_SEND:
        if (res >= 0) {
            x->pos = op->offset + res;
            x->pub.sent += (uint32_t)res;
            if (res)
                event(c, x, US_QUEUED, op->offset, (uint32_t)res, -1);
        } else if (!retryable(res)) {
            fail(x, res, IORING_OP_SPLICE, 0);
        }
        break;
    case R_FILL:
        if (res >= 0 && (uint32_t)res < op->len) {
            if (op->offset + res < t->end)
                t->end = op->offset + res;  /* the file ended early */
        } else if (res < 0 && !retryable(res)) {
            for (k = 0; k < t->n; k++)
                if (tee_live(t->dest[k]))
                    fail(t->dest[k], res, IORING_OP_SPLICE, 1);
        }
        break;
    case R_INSTALL:
        if (res < 0)
            fail(x, res, IORING_OP_FILES_UPDATE, op->offset == 1);
        break;
    case R_CANCEL:
        t->cancel_left--;
        if (res != -ENOENT)
            t->cancel_found = 1;
        break;
    }
    tee_op_over(c, i);
}

static void tee_cancels(struct us_core *c, struct tee *t, struct xfer *only);

static void tee_op_over(struct us_core *c, uint32_t i)
{
    struct op *op = &c->ops[i];
    struct tee *t = op->x->tee;
    int role = op->role, in_chain = role == R_FILL || role == R_TEE || role == R_SEND;
    struct xfer *x = op->x;
    op_free(c, i);
    t->outstanding--;
    if (role == R_CANCEL) {
        if (!t->cancel_left && !t->cancel_found && t->chain_left)
            tee_cancels(c, t, x->cancelled ? x : NULL);  /* found nothing: again [KF 24] */
    } else if (in_chain && --t->chain_left == 0) {
        tee_chain_over(c, t);
    }
    if (!t->chain_left)
        tee_maybe_settle(c, t);  /* may free t */
}

/* Cancel the chain's members still out (only one destination's sends when `only` is given). */
static void tee_cancels(struct us_core *c, struct tee *t, struct xfer *only)
{
    unsigned k;
    t->cancel_found = 0;
    for (k = 0; k < t->chain_len; k++) {
        uint64_t target = t->chain[k];
        struct op *op = &c->ops[(uint32_t)target];
        struct io_uring_sqe *sqe;
        uint32_t i;
        if (op->gen != (uint32_t)(target >> 32) || op->state != OP_RESULT)
            continue;
        if (only && (op->x != only || op->role != R_SEND))
            continue;
        if (!room(c, 1) || !(i = op_new(c, op->x, IORING_OP_ASYNC_CANCEL, R_CANCEL)))
            break;
        sqe = sqe_for(c, NULL, i, 0);
        io_uring_prep_cancel64(sqe, target, 0);
        t->cancel_left++;
        t->outstanding++;
    }
}

static void tee_cancel_dest(struct us_core *c, struct xfer *x)
{
    struct tee *t = x->tee;
    x->cancelled = 1;
    if (t->chain_left) {
        if (!t->cancel_left)
            tee_cancels(c, t, x);
    } else {
        ready(c, t->dest[0]);
    }
}

/* Start sending [offset, offset + count) of the file (count < 0: to its end) to n sockets.
 * out[i] gets destination i's transfer (one reference each, for Python). 0 or -errno; the reason
 * of a refusal is in us_core_start_error as for us_start. */
int us_tee(struct us_core *c, int file_fd, const int *socks, unsigned n, int64_t offset, int64_t count,
           int notify, struct us_xfer **out)
{
    struct stat st;
    struct tee *t;
    unsigned i;
    int err = 0;
    int64_t end;

    if (c->closed)
        return start_failed(c, US_START_CLOSED, EBADF), -EBADF;
    if (!n || 2 * n > c->sq_entries)
        return start_failed(c, US_START_OTHER, EINVAL), -EINVAL;
    if (fstat(file_fd, &st) < 0)
        return start_failed(c, US_START_FSTAT, errno), -errno;
    if (!S_ISREG(st.st_mode))
        return start_failed(c, S_ISDIR(st.st_mode) ? US_START_DIR : US_START_NOT_REGULAR, EINVAL), -EINVAL;
    if (offset > st.st_size) {
        c->start_size = st.st_size;
        return start_failed(c, US_START_OFFSET, EINVAL), -EINVAL;
    }
    end = count < 0 || count > st.st_size - offset ? st.st_size : offset + count;
    t = calloc(1, sizeof(*t));
    if (!t || !(t->dest = calloc(n, sizeof(*t->dest))) || !(t->pipes = calloc(n, sizeof(*t->pipes))) ||
        !(t->mark = calloc(n, sizeof(int64_t))) || !(t->pos = calloc(n, sizeof(int64_t))) ||
        !(t->chain = calloc(2 * n * WINDOW + 2, sizeof(uint64_t))))
        goto nomem;
    t->n = n;
    t->end = end;
    t->file = -1;
    t->window = c->sq_entries / (2 * n) < WINDOW ? c->sq_entries / (2 * n) : WINDOW;
    if (!t->window)
        t->window = 1;
    t->src = pipe_get(c, &err);
    for (i = 0; t->src && i + 1 < n; i++)
        if (!(t->pipes[i] = pipe_get(c, &err)))
            break;
    if (!t->src || (n > 1 && !t->pipes[n - 2]))
        goto fail;
    if (n > 1) {  /* the last destination reads the source pipe: its own pipe is one of the others' */
        t->pipes[n - 1] = NULL;
    }
    for (i = 0; i < n; i++) {
        struct xfer *x = calloc(1, sizeof(*x));
        if (!x)
            goto nomem;
        x->core = c;
        x->refs = 2;
        x->pub.id = c->next_id++;
        x->pub.offset = offset;
        x->pub.end = end;
        x->pub.planned = end - offset;
        x->pub.mode = US_MODE_SPLICE;
        x->pub.notify = (uint8_t)notify;
        x->pub.events = x->inline_events;
        x->pub.started_ns = now_ns();
        x->cap_events = EVENTS_INLINE;
        x->pos = offset;
        x->sock = x->file = -1;
        x->tee = t;
        t->dest[i] = x;
    }
    /* hold the file and the sockets now, as us_start does */
    if (c->nfree_slots >= n + 1 && room(c, n + 1)) {
        struct io_uring_sqe *sqe;
        uint32_t op_i;
        t->file = slot_get(c);
        t->file_fixed = t->file_held = 1;
        op_i = op_new(c, t->dest[0], IORING_OP_FILES_UPDATE, R_INSTALL);
        c->ops[op_i].offset = 1;
        t->dest[0]->install_fd[1] = file_fd;
        sqe = sqe_for(c, NULL, op_i, 0);
        io_uring_prep_files_update(sqe, &t->dest[0]->install_fd[1], 1, t->file);
        t->outstanding++;
        for (i = 0; i < n; i++) {
            struct xfer *x = t->dest[i];
            x->sock = slot_get(c);
            x->sock_fixed = x->sock_held = 1;
            x->install_fd[0] = socks[i];
            op_i = op_new(c, x, IORING_OP_FILES_UPDATE, R_INSTALL);
            sqe = sqe_for(c, NULL, op_i, 0);
            io_uring_prep_files_update(sqe, x->install_fd, 1, x->sock);
            t->outstanding++;
        }
    } else {
        t->file = dup_fd(file_fd);
        if (t->file < 0)
            goto fail_errno;
        t->file_held = 1;
        for (i = 0; i < n; i++) {
            struct xfer *x = t->dest[i];
            x->sock = dup_fd(socks[i]);
            if (x->sock < 0)
                goto fail_errno;
            x->sock_held = 1;
        }
        c->st.fds_duplicated++;
    }
    for (i = 0; i < n; i++) {
        struct xfer *x = t->dest[i];
        activate(c, x);
        out[i] = &x->pub;
    }
    tee_pump(c, t);
    if (c->urgent)
        submit(c);
    if (io_uring_cq_ready(&c->ring))
        reap_visible(c);
    pump_ready(c);
    if (c->urgent)
        submit(c);
    return 0;
fail_errno:
    err = -errno;
fail:
    /* nothing was submitted: dup path only (the install path cannot fail before submitting) */
    for (i = 0; i < n; i++) {
        struct xfer *x = t->dest[i];
        if (x && x->sock_held)
            close(x->sock);
        free(x);
    }
    if (t->file_held && !t->file_fixed)
        close(t->file);
    if (t->src)
        pipe_put(c, t->src);
    for (i = 0; i < n; i++)
        if (t->pipes[i])
            pipe_put(c, t->pipes[i]);
    free(t->dest); free(t->pipes); free(t->mark); free(t->pos); free(t->chain); free(t);
    start_failed(c, US_START_OTHER, -err);
    return err;
nomem:
    err = -ENOMEM;
    if (t)
        goto fail;
    start_failed(c, US_START_OTHER, ENOMEM);
    return err;
}

/* ---- the mapping cache ---------------------------------------------------------------------- */

static struct us_map *map_new(int fd, const struct stat *st, int large, int *err)
{
    struct us_map *m = calloc(1, sizeof(*m));
    void *p;
    if (!m) {
        *err = -ENOMEM;
        return NULL;
    }
    m->fd = dup_fd(fd);
    if (m->fd < 0) {
        *err = -errno;
        free(m);
        return NULL;
    }
    p = mmap(NULL, (size_t)st->st_size, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        *err = -errno;
        close(m->fd);
        free(m);
        return NULL;
    }
    m->addr = (uint64_t)(uintptr_t)p;
    m->length = (uint64_t)st->st_size;
    m->dev = st->st_dev;
    m->ino = st->st_ino;
    m->mtime_ns = (int64_t)st->st_mtim.tv_sec * 1000000000LL + st->st_mtim.tv_nsec;
    m->large = (uint8_t)large;
    return m;
}

/* Close the mapping's descriptor early (its ring is gone: no truncation check will run). */
static void map_close_fd(struct us_map *m)
{
    if (m->fd >= 0)
        close(m->fd);
    m->fd = -1;
}

/* Unmap and free; only once no transfer sends from it. */
static int map_free(struct us_map *m)
{
    int ret = 0;
    if (munmap((void *)(uintptr_t)m->addr, m->length) < 0)
        ret = -errno;
    map_close_fd(m);
    free(m);
    return ret;
}

/* The mapping to send the file of fd (whose fstat is st) from: the cached one while the file is
 * the same (device, inode, size, mtime), else a new one. Files above large_map bytes get one of
 * their own, which their transfer unmaps when it settles. Up to keep_maps idle ones stay cached,
 * the least recently used evicted first; a busy one is never unmapped. */
static struct us_map *map_get(struct us_core *c, int fd, const struct stat *st, int *err)
{
    int64_t mtime = (int64_t)st->st_mtim.tv_sec * 1000000000LL + st->st_mtim.tv_nsec;
    struct us_map *m;
    unsigned i;
    if ((uint64_t)st->st_size > c->large_map) {
        m = map_new(fd, st, 1, err);
        if (m)
            c->st.mappings_created++;
        return m;
    }
    for (i = 0; i < c->nmaps; i++) {
        m = c->maps[i];
        if (m->ino == st->st_ino && m->dev == st->st_dev && m->length == (uint64_t)st->st_size &&
            m->mtime_ns == mtime) {
            m->last_use = ++c->map_clock;
            return m;
        }
    }
    m = map_new(fd, st, 0, err);
    if (!m)
        return NULL;
    c->st.mappings_created++;
    m->last_use = ++c->map_clock;
    if (c->nmaps >= c->keep_maps) {  /* evict the least recently used idle mapping */
        unsigned lru = c->nmaps;
        for (i = 0; i < c->nmaps; i++)
            if (!c->maps[i]->users && (lru == c->nmaps || c->maps[i]->last_use < c->maps[lru]->last_use))
                lru = i;
        if (lru < c->nmaps) {
            map_free(c->maps[lru]);
            c->maps[lru] = c->maps[--c->nmaps];
        }
    }
    if (c->nmaps == c->cap_maps) {
        unsigned cap = c->cap_maps ? c->cap_maps * 2 : 16;
        struct us_map **grown = realloc(c->maps, cap * sizeof(*grown));
        if (!grown) {
            m->large = 1;  /* not cached: its transfer unmaps it */
            return m;
        }
        c->maps = grown;
        c->cap_maps = cap;
    }
    c->maps[c->nmaps++] = m;
    return m;
}

static void map_put(struct us_map *m)
{
    if (--m->users == 0 && m->large)
        map_free(m);
}

/* Unmap the idle cached mappings; busy ones (the kernel may still read them) stay mapped, their
 * descriptors closed. */
static void maps_close(struct us_core *c)
{
    unsigned i, kept = 0;
    for (i = 0; i < c->nmaps; i++) {
        struct us_map *m = c->maps[i];
        if (m->users) {
            map_close_fd(m);
            c->maps[kept++] = m;
        } else {
            map_free(m);
        }
    }
    c->nmaps = kept;
}

unsigned us_core_mappings_busy(struct us_core *c)
{
    unsigned i, n = 0;
    struct xfer *x;
    for (i = 0; i < c->nmaps; i++)
        n += c->maps[i]->users > 0;
    for (x = c->active; x; x = x->next_active)
        n += x->map && x->map->large;
    return n;
}

int us_core_start_error(struct us_core *c, int64_t *size)
{
    *size = c->start_size;
    return c->start_error;
}
