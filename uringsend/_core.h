/*
 * The transfer engine's interface: read by cffi's cdef() and #included by _core.c, so every struct
 * here has exactly one definition. Only plain integer #defines (cffi accepts those too).
 *
 * Ownership in one paragraph: a struct us_core owns the io_uring, the op table, the pipe pool,
 * the registered buffer pool, the file mappings and every transfer until it settles. A transfer (struct us_xfer) is
 * reference counted: one reference for the core while it is active (not settled), one for the
 * Python handle (dropped by us_xfer_put when the handle is collected). Whoever drops the last one
 * frees it, header bytes and timeline included; the kernel can reference a transfer's memory only
 * while it is active.
 */

/* Modes (the engine each transfer runs). */
#define US_MODE_SPLICE 1
#define US_MODE_ZEROCOPY 2
#define US_MODE_MMAP 3
#define US_MODE_COPY 4
#define US_MODE_AUTO 5       /* memory sources: SEND_ZC until the kernel reports copying, then SEND */

/* Event kinds of a transfer's timeline. */
#define US_SENT 1
#define US_RELEASED 2
#define US_QUEUED 3

/* Why a transfer failed (us_xfer.err_kind); us_xfer.error holds the errno. */
#define US_ERR_OP 1          /* an operation failed: err_opcode on the socket or the file (err_on_file) */
#define US_ERR_CANCELLED 2   /* cancelled before the end */
#define US_ERR_TRUNCATED 3   /* mapping mode: the file shrank mid-page; err_size is the new size */
#define US_ERR_MEMLOCK 4     /* SEND_ZC failed ENOMEM: pinned pages count against RLIMIT_MEMLOCK */
#define US_ERR_STALL 5       /* US_MAX_STALLS chains in a row moved nothing */

/* Why a transfer sends differently from what it was asked (us_xfer.fallback). */
#define US_FALLBACK_NO_SEND_ZC 1  /* SEND_ZC answered EOPNOTSUPP (AF_UNIX): copying sends */
#define US_FALLBACK_COPIED 2      /* US_MODE_AUTO: the kernel copied SEND_ZC data: copying sends */

/* Why us_start refused (us_core_start_error); errno says the rest. */
#define US_START_CLOSED 1
#define US_START_NO_POOL 2
#define US_START_FSTAT 3
#define US_START_DIR 4
#define US_START_NOT_REGULAR 5
#define US_START_OFFSET 6       /* offset past the end: the size is reported */
#define US_START_MAP 7
#define US_START_OTHER 8
#define US_START_NO_SLOT 9      /* every stream buffer slot of the registered buffer table is taken */
#define US_START_REGISTER 10    /* registering the stream buffer failed: errno says why */

/* What changed for a watched transfer in one us_run (us_change.what), or a raw op's CQE. */
#define US_CH_DONE 1
#define US_CH_SETTLED 2
#define US_CH_RELEASED 4
#define US_CH_RAW 8

/* Our own opcodes, beyond the kernel's: SEND_ZC from a registered buffer (raw ops), and the
 * F_DUPFD_CLOEXEC a transfer makes when the registered file table is full (err_opcode). */
#define US_OP_SEND_ZC_FIXED 250
#define US_OP_DUP 251

struct us_event {
    int64_t offset;      /* file offset of the chunk; -1 for the header or trailer */
    int64_t t_ns;        /* CLOCK_MONOTONIC when the completion was handled */
    uint32_t nbytes;
    uint8_t kind;        /* US_SENT, US_RELEASED, US_QUEUED */
    int8_t copied;       /* US_RELEASED: 1 the kernel copied, 0 it sent the pages, -1 not reported */
};

/* One transfer. Fields above `priv` are what Python reads; it never writes any of them. */
struct us_xfer {
    uint64_t id;
    int64_t offset;          /* first file byte */
    int64_t end;             /* one past the last file byte (lowered when the file ends early) */
    int64_t planned;         /* bytes planned at the start (the range clamped to the file's size) */
    uint64_t sent;           /* file bytes the socket accepted, in order */
    uint64_t header_sent;
    uint64_t trailer_sent;
    uint64_t released;       /* file bytes whose release was reported */
    uint64_t stranded;       /* bytes found in a pipe after a broken chain, and discarded */
    int64_t started_ns;
    int64_t released_ns;     /* when the last RELEASED event so far was recorded; 0 none */
    int64_t err_size;        /* US_ERR_TRUNCATED: the file's size when noticed */
    int32_t error;           /* errno of the first failure; 0 none */
    uint32_t nevents;
    uint32_t header_len;
    uint32_t trailer_len;
    struct us_event *events;
    uint8_t mode;
    uint8_t err_kind;
    uint8_t err_opcode;
    uint8_t err_on_file;
    uint8_t fallback;
    uint8_t done;            /* no more bytes will be sent */
    uint8_t settled;         /* done, and the kernel holds nothing of this transfer any more */
    uint8_t notify;          /* Python watches it: report changes in us_run's batch */
    /* Memory sources (us_send, us_stream): offsets count bytes from the start of the memory. */
    uint64_t released_upto;  /* every byte below this offset has been released */
    uint64_t copied_bytes;   /* released bytes the kernel copied */
    uint64_t zerocopy_bytes; /* released bytes the kernel sent as pages (no copy) */
};

struct us_change {
    uint64_t id;             /* transfer id, or the raw op's user_data */
    int32_t res;             /* US_CH_RAW: the CQE */
    uint32_t flags;
    uint32_t what;
};

/* A raw operation (kernel-fact tests, the tee engine): prepared as given, CQEs reported as is. */
struct us_rawop {
    uint64_t user_data;      /* set by us_raw_submit */
    uint64_t addr;
    int64_t off;
    int64_t off_in;
    int32_t fd;
    int32_t fd_in;
    uint32_t len;
    uint32_t msg_flags;      /* SEND / SEND_ZC */
    uint32_t splice_flags;   /* SPLICE / TEE */
    uint32_t poll_mask;      /* POLL_ADD */
    uint16_t zc_flags;
    uint16_t buf_index;
    uint8_t opcode;
    uint8_t sqe_flags;
};

/* One CQE as the core saw it (kept only when tracing). */
struct us_trace {
    int64_t t_ns;
    uint64_t user_data;
    uint64_t xfer_id;        /* 0: not a transfer's op (raw, cancel, unknown) */
    int32_t res;
    uint32_t flags;
    int64_t offset;          /* file offset of the op's chunk; -1 none (header, raw, ...) */
    uint32_t len;
    uint8_t opcode;
    uint8_t role;
};

struct us_stats {
    uint64_t transfers_started;
    uint64_t transfers_active;   /* started, not yet settled */
    uint64_t transfers_running;  /* started, not yet done */
    uint64_t ops_in_flight;      /* results still due */
    uint64_t pending_notifs;
    uint64_t completions;
    uint64_t notifs;
    uint64_t copied;
    uint64_t zerocopy;
    uint64_t orphan_cqes;
    uint64_t sq_full;
    uint64_t enters;
    uint64_t zc_bytes_unreleased;
    uint64_t buffers_total;
    uint64_t buffers_free;
    uint64_t pipes_created;
    uint64_t pipes_idle;
    uint64_t mappings_created;
    uint64_t fixed_files;        /* slots in the registered file table (0: fds are duplicated) */
    uint64_t fds_duplicated;     /* transfers that found no free slot and duplicated their fds */
    uint64_t raw_in_flight;
    uint64_t kept_alive;
};


struct us_core;

struct us_core *us_core_new(unsigned entries, unsigned flags, unsigned cq_entries, unsigned file_slots,
                            int *err);
int us_core_flags(struct us_core *c);
int us_core_fd(struct us_core *c);
unsigned us_core_sq_entries(struct us_core *c);
unsigned us_core_cq_entries(struct us_core *c);
struct us_stats *us_core_stats(struct us_core *c);
struct us_change *us_core_changes(struct us_core *c);
void us_core_configure(struct us_core *c, uint32_t chunk_size, uint32_t copy_chunk_size,
                       uint64_t zc_budget, uint32_t pipe_size, uint32_t max_idle_pipes,
                       uint32_t keep_maps, uint64_t large_map);
int us_core_set_trace(struct us_core *c, int on);
unsigned us_core_trace(struct us_core *c, struct us_trace **out);
int us_core_register_eventfd(struct us_core *c, int fd);
int us_core_iowq_max_workers(struct us_core *c, unsigned bounded, unsigned unbounded);
int us_core_pool(struct us_core *c, uint32_t count, uint32_t size);
uint64_t us_core_pool_address(struct us_core *c, uint32_t index);
unsigned us_core_busy(struct us_core *c);
unsigned us_core_changes_pending(struct us_core *c);
uint64_t us_core_idle_pipe_bytes(struct us_core *c);
int us_core_close(struct us_core *c);
void us_core_free(struct us_core *c);

struct us_xfer *us_start(struct us_core *c, int mode, int sock_fd, int file_fd, int64_t offset,
                         int64_t count, const char *extra, uint32_t header_len, uint32_t trailer_len,
                         int notify);
int us_core_start_error(struct us_core *c, int64_t *size);
int us_tee(struct us_core *c, int file_fd, const int *socks, unsigned n, int64_t offset, int64_t count,
           int notify, struct us_xfer **out);
unsigned us_core_mappings_busy(struct us_core *c);
void us_cancel(struct us_core *c, struct us_xfer *x);
void us_cancel_all(struct us_core *c);
void us_xfer_put(struct us_xfer *x);
int us_run(struct us_core *c, unsigned wait_nr, int64_t timeout_ns, int ack);

/* Memory sources. us_send: len bytes at addr (pinned by the caller until the transfer settles).
 * us_stream: an open transfer from a circular buffer of size bytes at addr, registered by the core
 * in a slot of its buffer table (and unregistered when the transfer settles); us_stream_commit
 * makes the next n bytes of the stream (at stream offset modulo size) sendable, us_stream_end
 * lets the transfer finish once they are sent. mode: US_MODE_MMAP (SEND_ZC), US_MODE_COPY (SEND),
 * or, for us_stream, US_MODE_AUTO. */
struct us_xfer *us_send(struct us_core *c, int mode, int sock_fd, uint64_t addr, uint64_t len, int notify);
struct us_xfer *us_stream(struct us_core *c, int mode, int sock_fd, uint64_t addr, uint64_t size, int notify);
int us_stream_commit(struct us_core *c, struct us_xfer *x, uint64_t n);
void us_stream_end(struct us_core *c, struct us_xfer *x);

int us_raw_submit(struct us_core *c, struct us_rawop *ops, unsigned n);

