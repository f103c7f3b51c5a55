# Declarations only (uvloop-style): what ringblob._uring uses from liburing 2.3
# (<liburing.h>, Debian 12's liburing-dev) and the kernel's <linux/io_uring.h>.
# Nothing here is newer than liburing 2.3; check /usr/include/liburing.h before
# adding a function.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t


cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len


cdef extern from "<liburing.h>" nogil:
    # -- kernel ABI (linux/io_uring.h, included by liburing.h) ---------------
    struct __kernel_timespec:
        long long tv_sec
        long long tv_nsec

    struct io_uring_sqe:
        uint8_t opcode
        uint8_t flags
        uint16_t ioprio
        int32_t fd
        uint64_t off
        uint64_t addr
        uint32_t len
        uint64_t user_data
        uint16_t buf_index
        int rw_flags            # in the kernel a union member (__kernel_rwf_t for reads and writes)

    struct io_uring_cqe:
        uint64_t user_data
        int32_t res
        uint32_t flags

    struct io_sqring_offsets:
        pass

    struct io_cqring_offsets:
        pass

    struct io_uring_params:
        uint32_t sq_entries
        uint32_t cq_entries
        uint32_t flags
        uint32_t sq_thread_cpu
        uint32_t sq_thread_idle
        uint32_t features
        uint32_t wq_fd

    enum:
        IORING_SETUP_IOPOLL
        IORING_SETUP_SQPOLL
        IORING_SETUP_CQSIZE
        IORING_SETUP_CLAMP
        IORING_SETUP_SUBMIT_ALL
        IORING_SETUP_COOP_TASKRUN
        IORING_SETUP_TASKRUN_FLAG
        IORING_SETUP_SINGLE_ISSUER
        IORING_SETUP_DEFER_TASKRUN

        IOSQE_FIXED_FILE
        IOSQE_IO_DRAIN
        IOSQE_IO_LINK
        IOSQE_IO_HARDLINK
        IOSQE_ASYNC

        IORING_FSYNC_DATASYNC
        RWF_DSYNC               # <linux/fs.h>, included by linux/io_uring.h: per-write O_DSYNC
        IORING_ASYNC_CANCEL_ALL
        IORING_ASYNC_CANCEL_ANY

        IORING_SQ_NEED_WAKEUP
        IORING_SQ_CQ_OVERFLOW
        IORING_SQ_TASKRUN
        IORING_CQ_EVENTFD_DISABLED

        IORING_FEAT_NODROP
        IORING_FEAT_EXT_ARG

    # -- liburing's ring handle ----------------------------------------------
    struct io_uring_sq:
        unsigned *khead
        unsigned *ktail
        unsigned *kflags
        unsigned *kdropped
        unsigned ring_entries

    struct io_uring_cq:
        unsigned *khead
        unsigned *ktail
        unsigned *kflags
        unsigned *koverflow
        unsigned ring_entries

    struct io_uring:
        io_uring_sq sq
        io_uring_cq cq
        unsigned flags
        int ring_fd
        unsigned features
        int enter_ring_fd

    # -- setup and teardown ----------------------------------------------------
    int io_uring_queue_init_params(unsigned entries, io_uring *ring, io_uring_params *p)
    void io_uring_queue_exit(io_uring *ring)
    int io_uring_register_buffers(io_uring *ring, const iovec *iovecs, unsigned nr_iovecs)
    int io_uring_unregister_buffers(io_uring *ring)
    int io_uring_register_files(io_uring *ring, const int *files, unsigned nr_files)
    int io_uring_unregister_files(io_uring *ring)
    int io_uring_register_eventfd(io_uring *ring, int fd)
    int io_uring_unregister_eventfd(io_uring *ring)
    int io_uring_register_ring_fd(io_uring *ring)

    # -- submission ------------------------------------------------------------
    io_uring_sqe *io_uring_get_sqe(io_uring *ring)
    unsigned io_uring_sq_ready(const io_uring *ring)
    unsigned io_uring_sq_space_left(const io_uring *ring)
    int io_uring_submit(io_uring *ring)
    int io_uring_submit_and_wait(io_uring *ring, unsigned wait_nr)
    void io_uring_prep_read_fixed(io_uring_sqe *sqe, int fd, void *buf, unsigned nbytes,
                                  uint64_t offset, int buf_index)
    void io_uring_prep_write_fixed(io_uring_sqe *sqe, int fd, const void *buf, unsigned nbytes,
                                   uint64_t offset, int buf_index)
    void io_uring_prep_fsync(io_uring_sqe *sqe, int fd, unsigned fsync_flags)
    void io_uring_prep_cancel64(io_uring_sqe *sqe, uint64_t user_data, int flags)
    void io_uring_sqe_set_data64(io_uring_sqe *sqe, uint64_t data)
    void io_uring_sqe_set_flags(io_uring_sqe *sqe, unsigned flags)

    # -- completion ------------------------------------------------------------
    unsigned io_uring_cq_ready(const io_uring *ring)
    unsigned io_uring_peek_batch_cqe(io_uring *ring, io_uring_cqe **cqes, unsigned count)
    void io_uring_cq_advance(io_uring *ring, unsigned nr)
    uint64_t io_uring_cqe_get_data64(const io_uring_cqe *cqe)
    int io_uring_wait_cqes(io_uring *ring, io_uring_cqe **cqe_ptr, unsigned wait_nr,
                           __kernel_timespec *ts, void *sigmask)
    int io_uring_get_events(io_uring *ring)
