# Declarations only: the Linux/libc pieces ringblob._uring needs besides
# liburing (eventfd, mmap flags, thread identity).

from libc.stdint cimport uint64_t


cdef extern from "<sys/eventfd.h>" nogil:
    ctypedef uint64_t eventfd_t
    enum:
        EFD_CLOEXEC
        EFD_NONBLOCK
    int eventfd(unsigned int initval, int flags)
    int eventfd_read(int fd, eventfd_t *value)
    int eventfd_write(int fd, eventfd_t value)


cdef extern from "<sys/mman.h>" nogil:
    enum:
        PROT_READ
        PROT_WRITE
        MAP_PRIVATE
        MAP_ANONYMOUS
        MAP_POPULATE
    void *MAP_FAILED
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)


cdef extern from "<unistd.h>" nogil:
    int close(int fd)
    long sysconf(int name)
    enum:
        _SC_PAGESIZE
    int usleep(unsigned usec)


cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EAGAIN
        EINTR
        EBUSY
        ECANCELED
        EIO
        ETIME
        EINVAL
        ENOMEM
