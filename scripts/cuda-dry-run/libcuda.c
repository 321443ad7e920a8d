/*
 * A stand-in for the CUDA driver (libcuda.so.1) for dry runs on a machine without a GPU.
 *
 * It answers as one H100 (compute capability 9.0, 132 SMs, 80 GiB) would, keeps "device"
 * memory in host memory (a device pointer is a host address, so uploads and read-backs are
 * plain copies), and never runs a kernel: cuModuleLoadData writes each PTX module it is given
 * to $ARBOR_DRY_CUDA_DIR/module-PID-N.ptx, and cuLaunchKernel checks the launch against the
 * H100's limits and appends one line to $ARBOR_DRY_CUDA_DIR/launches.tsv (kernel, PID-N of
 * its module, grid x/y/z, block x/y/z, dynamic shared bytes, ok or OVER-LIMIT). Results read back are whatever
 * the buffers held: a dry run checks that every kernel is generated, compiled by NVRTC and
 * launched within limits, not what it computes.
 *
 * Only the entry points that cudarc/CubeCL call are here; cudarc loads each symbol when it
 * is first called, so a missing one fails loudly ("Missing symbol ...").
 *
 * Build: cc -shared -fPIC -O1 -o libcuda.so.1 libcuda.c
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef uint64_t CUdeviceptr;
typedef void *CUcontext, *CUstream, *CUevent, *CUmodule;

enum {
    OK = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    INVALID_DEVICE = 101,
    INVALID_IMAGE = 200,
    NOT_FOUND = 500,
};

struct module { int id; char *ptx; };
struct function { struct module *module; char name[512]; };

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int modules;
static int context_tag, stream_tag, event_tag;

static const char *dir(void) {
    const char *d = getenv("ARBOR_DRY_CUDA_DIR");
    return d && *d ? d : ".";
}

/* The launch log, opened once and flushed at every synchronization and at exit (a launch
 * costs the host what it would with a real driver, not a file open). Called under `lock`. */
static FILE *log_file;
static void flush_log(void) {
    pthread_mutex_lock(&lock);
    if (log_file) fflush(log_file);
    pthread_mutex_unlock(&lock);
}
static FILE *launch_log(void) {
    if (!log_file) {
        char path[4096];
        snprintf(path, sizeof path, "%s/launches.tsv", dir());
        log_file = fopen(path, "a");
        if (!log_file) perror(path);
        else atexit(flush_log);
    }
    return log_file;
}

/* The H100 SXM's answers; 0 for attributes CubeCL does not ask. */
static int attribute(int attr) {
    switch (attr) {
    case 1: return 1024;        /* max threads per block */
    case 2: return 1024;        /* max block dim x */
    case 3: return 1024;        /* y */
    case 4: return 64;          /* z */
    case 5: return 2147483647;  /* max grid dim x */
    case 6: return 65535;       /* y */
    case 7: return 65535;       /* z */
    case 8: return 49152;       /* shared memory per block */
    case 10: return 32;         /* warp size */
    case 12: return 65536;      /* registers per block */
    case 13: return 1980000;    /* clock kHz */
    case 16: return 132;        /* multiprocessors */
    case 39: return 2048;       /* threads per multiprocessor */
    case 75: return 9;          /* compute capability major */
    case 76: return 0;          /* minor */
    case 81: return 233472;     /* shared memory per multiprocessor */
    case 82: return 65536;      /* registers per multiprocessor */
    case 97: return 232448;     /* shared memory per block, opt-in */
    default: return 0;
    }
}

CUresult cuInit(unsigned flags) { (void)flags; return OK; }
CUresult cuDriverGetVersion(int *v) { *v = 13000; return OK; }
CUresult cuDeviceGetCount(int *n) { *n = 1; return OK; }
CUresult cuDeviceGet(CUdevice *d, int ordinal) {
    if (ordinal != 0) return INVALID_DEVICE;
    *d = 0;
    return OK;
}
CUresult cuDeviceGetAttribute(int *v, int attr, CUdevice d) {
    if (d != 0) return INVALID_DEVICE;
    *v = attribute(attr);
    return OK;
}
CUresult cuDeviceGetName(char *name, int len, CUdevice d) {
    (void)d;
    snprintf(name, (size_t)len, "NVIDIA H100 (Arbor dry run: no kernel runs)");
    return OK;
}
CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice d) { (void)d; *bytes = 80ull << 30; return OK; }
CUresult cuMemGetInfo_v2(size_t *free_, size_t *total) {
    *free_ = 79ull << 30;
    *total = 80ull << 30;
    return OK;
}

CUresult cuDevicePrimaryCtxRetain(CUcontext *c, CUdevice d) { (void)d; *c = &context_tag; return OK; }
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) { (void)d; return OK; }
CUresult cuCtxSetCurrent(CUcontext c) { (void)c; return OK; }
CUresult cuCtxGetCurrent(CUcontext *c) { *c = &context_tag; return OK; }
CUresult cuCtxPushCurrent_v2(CUcontext c) { (void)c; return OK; }
CUresult cuCtxPopCurrent_v2(CUcontext *c) { if (c) *c = &context_tag; return OK; }
CUresult cuCtxSynchronize(void) { flush_log(); return OK; }
CUresult cuCtxGetDevice(CUdevice *d) { *d = 0; return OK; }

CUresult cuStreamCreate(CUstream *s, unsigned flags) { (void)flags; *s = &stream_tag; return OK; }
CUresult cuStreamCreateWithPriority(CUstream *s, unsigned flags, int p) {
    (void)flags; (void)p; *s = &stream_tag; return OK;
}
CUresult cuStreamDestroy_v2(CUstream s) { (void)s; return OK; }
CUresult cuStreamSynchronize(CUstream s) { (void)s; flush_log(); return OK; }
CUresult cuStreamQuery(CUstream s) { (void)s; return OK; }
CUresult cuStreamWaitEvent(CUstream s, CUevent e, unsigned f) { (void)s; (void)e; (void)f; return OK; }

CUresult cuEventCreate(CUevent *e, unsigned flags) { (void)flags; *e = &event_tag; return OK; }
CUresult cuEventRecord(CUevent e, CUstream s) { (void)e; (void)s; return OK; }
CUresult cuEventSynchronize(CUevent e) { (void)e; flush_log(); return OK; }
CUresult cuEventQuery(CUevent e) { (void)e; return OK; }
CUresult cuEventDestroy_v2(CUevent e) { (void)e; return OK; }
CUresult cuEventElapsedTime(float *ms, CUevent a, CUevent b) { (void)a; (void)b; *ms = 0; return OK; }

static CUresult alloc(CUdeviceptr *p, size_t n) {
    void *m = calloc(1, n ? n : 1);
    if (!m) return OUT_OF_MEMORY;
    *p = (CUdeviceptr)(uintptr_t)m;
    return OK;
}
CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t n) { return alloc(p, n); }
CUresult cuMemAllocAsync(CUdeviceptr *p, size_t n, CUstream s) { (void)s; return alloc(p, n); }
CUresult cuMemFree_v2(CUdeviceptr p) { free((void *)(uintptr_t)p); return OK; }
CUresult cuMemFreeAsync(CUdeviceptr p, CUstream s) { (void)s; free((void *)(uintptr_t)p); return OK; }
CUresult cuMemAllocHost_v2(void **p, size_t n) {
    *p = calloc(1, n ? n : 1);
    return *p ? OK : OUT_OF_MEMORY;
}
CUresult cuMemFreeHost(void *p) { free(p); return OK; }

CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void *h, size_t n) {
    memcpy((void *)(uintptr_t)d, h, n); return OK;
}
CUresult cuMemcpyDtoH_v2(void *h, CUdeviceptr d, size_t n) {
    memcpy(h, (void *)(uintptr_t)d, n); return OK;
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void *h, size_t n, CUstream s) {
    (void)s; return cuMemcpyHtoD_v2(d, h, n);
}
CUresult cuMemcpyDtoHAsync_v2(void *h, CUdeviceptr d, size_t n, CUstream s) {
    (void)s; return cuMemcpyDtoH_v2(h, d, n);
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr src, size_t n, CUstream s) {
    (void)s; memmove((void *)(uintptr_t)d, (void *)(uintptr_t)src, n); return OK;
}
CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, CUstream s) {
    (void)s; memset((void *)(uintptr_t)d, v, n); return OK;
}

/* The layout of CUDA_MEMCPY2D. */
struct memcpy2d {
    size_t src_x, src_y; int src_type; const void *src_host; CUdeviceptr src_device;
    void *src_array; size_t src_pitch;
    size_t dst_x, dst_y; int dst_type; void *dst_host; CUdeviceptr dst_device;
    void *dst_array; size_t dst_pitch;
    size_t width, height;
};
CUresult cuMemcpy2DAsync_v2(const struct memcpy2d *c, CUstream s) {
    (void)s;
    const char *src = c->src_type == 1 ? (const char *)c->src_host
                                       : (const char *)(uintptr_t)c->src_device;
    char *dst = c->dst_type == 1 ? (char *)c->dst_host : (char *)(uintptr_t)c->dst_device;
    if (c->src_array || c->dst_array || !src || !dst) return INVALID_VALUE;
    for (size_t y = 0; y < c->height; y++)
        memcpy(dst + (c->dst_y + y) * c->dst_pitch + c->dst_x,
               src + (c->src_y + y) * c->src_pitch + c->src_x, c->width);
    return OK;
}
CUresult cuMemcpy2D_v2(const struct memcpy2d *c) { return cuMemcpy2DAsync_v2(c, NULL); }

CUresult cuModuleLoadData(CUmodule *m, const void *image) {
    struct module *mod = calloc(1, sizeof *mod);
    if (!mod) return OUT_OF_MEMORY;
    mod->ptx = strdup((const char *)image);
    pthread_mutex_lock(&lock);
    mod->id = modules++;
    pthread_mutex_unlock(&lock);
    char path[4096];
    snprintf(path, sizeof path, "%s/module-%d-%04d.ptx", dir(), (int)getpid(), mod->id);
    FILE *f = fopen(path, "w");
    if (!f) { perror(path); return INVALID_VALUE; }
    fputs(mod->ptx, f);
    fclose(f);
    *m = mod;
    return OK;
}
CUresult cuModuleUnload(CUmodule m) { (void)m; return OK; }

CUresult cuModuleGetFunction(void **f, CUmodule m, const char *name) {
    struct module *mod = m;
    char entry[600];
    snprintf(entry, sizeof entry, ".entry %s(", name);
    if (!strstr(mod->ptx, entry)) return NOT_FOUND;
    struct function *fn = calloc(1, sizeof *fn);
    if (!fn) return OUT_OF_MEMORY;
    fn->module = mod;
    snprintf(fn->name, sizeof fn->name, "%s", name);
    *f = fn;
    return OK;
}
CUresult cuFuncSetAttribute(void *f, int attr, int value) { (void)f; (void)attr; (void)value; return OK; }
CUresult cuFuncGetAttribute(int *v, int attr, void *f) { (void)attr; (void)f; *v = 0; return OK; }

CUresult cuLaunchKernel(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned shared, CUstream s, void **params, void **extra) {
    (void)s; (void)params; (void)extra;
    struct function *fn = f;
    int ok = gx >= 1 && gy >= 1 && gz >= 1 && bx >= 1 && by >= 1 && bz >= 1 &&
             gx <= 2147483647u && gy <= 65535 && gz <= 65535 && bx <= 1024 && by <= 1024 &&
             bz <= 64 && (unsigned long long)bx * by * bz <= 1024 && shared <= 232448;
    pthread_mutex_lock(&lock);
    FILE *log = launch_log();
    if (log)
        fprintf(log, "%s\t%d-%04d\t%u\t%u\t%u\t%u\t%u\t%u\t%u\t%s\n", fn->name, (int)getpid(),
                fn->module->id, gx, gy, gz, bx, by, bz, shared, ok ? "ok" : "OVER-LIMIT");
    pthread_mutex_unlock(&lock);
    return ok ? OK : INVALID_VALUE;
}

/* NVRTC opens the driver too and asks it for private tables; without one it compiles alone. */
CUresult cuGetExportTable(const void **table, const void *id) {
    (void)id;
    *table = NULL;
    return NOT_FOUND;
}

CUresult cuGetErrorString(CUresult e, const char **s) {
    *s = e == OK ? "no error" : "error from the Arbor dry-run driver";
    return OK;
}
CUresult cuGetErrorName(CUresult e, const char **s) {
    *s = e == OK ? "CUDA_SUCCESS" : "CUDA_ERROR_DRY_RUN";
    return OK;
}
