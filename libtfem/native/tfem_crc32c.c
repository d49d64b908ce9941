/*
 * tfem_crc32c.c: CRC-32C with the SSE4.2 instruction where the processor
 * has it (8 bytes per instruction), else a table.
 *
 * Why here and not the crc32c package: the checksum is taken inside the
 * copy loop of the native core (tfem_file.c), chunk by chunk while the
 * bytes are still in cache, and C callers have no Python to call.
 *
 * Three independent streams hide the instruction's 3-cycle latency; they
 * are joined with the shift operator of the polynomial (the zlib
 * crc32_combine method, for a fixed stream length, precomputed once).
 */
#include <pthread.h>
#include <string.h>

#include "tfem_crc32c.h"

#define POLY 0x82F63B78u /* reflected Castagnoli polynomial */
#define STREAM 4096      /* bytes per stream per round (three streams) */
#define COPY_CHUNK (64 * 1024)

static uint32_t table[8][256];
static uint32_t shift_stream[4][256]; /* crc shifted over STREAM zero bytes, by byte */
static int have_sse42;
static pthread_once_t once = PTHREAD_ONCE_INIT;

/* Multiply a crc by x^(8*len) mod P, given the operator as a 32x32 matrix. */
static uint32_t gf2_times(const uint32_t *mat, uint32_t vec) {
    uint32_t sum = 0;
    for (int i = 0; vec; i++, vec >>= 1)
        if (vec & 1) sum ^= mat[i];
    return sum;
}

static void gf2_square(uint32_t *square, const uint32_t *mat) {
    for (int n = 0; n < 32; n++) square[n] = gf2_times(mat, mat[n]);
}

static void init(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ POLY : c >> 1;
        table[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++)
        for (int t = 1; t < 8; t++) table[t][n] = (table[t - 1][n] >> 8) ^ table[0][table[t - 1][n] & 0xFF];
    /* The operator for one zero bit, squared up to STREAM bytes. */
    uint32_t odd[32], even[32];
    odd[0] = POLY;
    for (int n = 1; n < 32; n++) odd[n] = 1u << (n - 1);
    gf2_square(even, odd); /* 2 bits */
    gf2_square(odd, even); /* 4 bits */
    gf2_square(even, odd); /* 1 byte */
    uint32_t *cur = even, *next = odd;
    for (uint32_t bytes = 1; bytes < STREAM; bytes *= 2) { /* STREAM is a power of two */
        gf2_square(next, cur);
        uint32_t *t = cur; cur = next; next = t;
    }
    for (int b = 0; b < 4; b++)
        for (uint32_t v = 0; v < 256; v++) shift_stream[b][v] = gf2_times(cur, v << (8 * b));
#if defined(__x86_64__)
    __builtin_cpu_init();
    have_sse42 = __builtin_cpu_supports("sse4.2");
#endif
}

static uint32_t shift(uint32_t crc) {
    return shift_stream[0][crc & 0xFF] ^ shift_stream[1][(crc >> 8) & 0xFF] ^
           shift_stream[2][(crc >> 16) & 0xFF] ^ shift_stream[3][crc >> 24];
}

static uint32_t sw(uint32_t crc, const unsigned char *p, size_t n) {
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= crc;
        crc = table[7][w & 0xFF] ^ table[6][(w >> 8) & 0xFF] ^ table[5][(w >> 16) & 0xFF] ^
              table[4][(w >> 24) & 0xFF] ^ table[3][(w >> 32) & 0xFF] ^ table[2][(w >> 40) & 0xFF] ^
              table[1][(w >> 48) & 0xFF] ^ table[0][w >> 56];
        p += 8;
        n -= 8;
    }
    while (n--) crc = (crc >> 8) ^ table[0][(crc ^ *p++) & 0xFF];
    return crc;
}

#if defined(__x86_64__)
/* The crc of p[0..n) continued from crc; with dst, each 8 bytes loaded are
 * also stored there: copy and checksum in one pass over memory (measured on
 * 1 GiB: 5.8 GB/s, against 4.7 for a memcpy and a crc pass per 64 KiB, and
 * 10 for a memcpy alone). `copy` is a constant at each call: the compiler
 * makes two loops of this one. */
__attribute__((target("sse4.2"), always_inline)) static inline uint32_t
hw_loop(uint32_t crc, const unsigned char *p, size_t n, unsigned char *dst, int copy) {
    uint64_t c0 = crc;
    while (n >= 3 * STREAM) { /* three streams at once, then joined */
        uint64_t c1 = 0, c2 = 0;
        for (size_t i = 0; i < STREAM; i += 8) {
            uint64_t a, b, c;
            memcpy(&a, p + i, 8);
            memcpy(&b, p + STREAM + i, 8);
            memcpy(&c, p + 2 * STREAM + i, 8);
            if (copy) {
                memcpy(dst + i, &a, 8);
                memcpy(dst + STREAM + i, &b, 8);
                memcpy(dst + 2 * STREAM + i, &c, 8);
            }
            c0 = __builtin_ia32_crc32di(c0, a);
            c1 = __builtin_ia32_crc32di(c1, b);
            c2 = __builtin_ia32_crc32di(c2, c);
        }
        c0 = shift(shift((uint32_t)c0) ^ (uint32_t)c1) ^ (uint32_t)c2;
        p += 3 * STREAM;
        if (copy) dst += 3 * STREAM;
        n -= 3 * STREAM;
    }
    if (copy) memcpy(dst, p, n);
    while (n >= 8) {
        uint64_t a;
        memcpy(&a, p, 8);
        c0 = __builtin_ia32_crc32di(c0, a);
        p += 8;
        n -= 8;
    }
    uint32_t c = (uint32_t)c0;
    while (n--) c = __builtin_ia32_crc32qi(c, *p++);
    return c;
}

__attribute__((target("sse4.2"))) static uint32_t hw(uint32_t crc, const unsigned char *p, size_t n) {
    return hw_loop(crc, p, n, NULL, 0);
}

__attribute__((target("sse4.2"))) static uint32_t hw_copy(uint32_t crc, const unsigned char *p, size_t n,
                                                          unsigned char *dst) {
    return hw_loop(crc, p, n, dst, 1);
}
#endif

uint32_t tfem_crc32c(uint32_t crc, const void *data, size_t length) {
    pthread_once(&once, init);
    crc = ~crc;
#if defined(__x86_64__)
    if (have_sse42) return ~hw(crc, data, length);
#endif
    return ~sw(crc, data, length);
}

/* Zero bytes change the crc register by the operator x^(8 length): its
 * matrix is squared up bit by bit of `length` (zlib's crc32_combine), so
 * a gap of any size costs 64 squarings at most, never a pass. */
uint32_t tfem_crc32c_zeros(uint32_t crc, uint64_t length) {
    uint32_t odd[32], even[32];
    if (length == 0) return crc;
    odd[0] = POLY; /* one zero bit */
    for (int n = 1; n < 32; n++) odd[n] = 1u << (n - 1);
    gf2_square(even, odd); /* 2 bits */
    gf2_square(odd, even); /* 4 bits */
    uint32_t reg = ~crc;
    for (;;) {
        gf2_square(even, odd); /* 1 byte, then 4, 16, ... */
        if (length & 1) reg = gf2_times(even, reg);
        if (!(length >>= 1)) break;
        gf2_square(odd, even); /* 2 bytes, then 8, 32, ... */
        if (length & 1) reg = gf2_times(odd, reg);
        if (!(length >>= 1)) break;
    }
    return ~reg;
}

void tfem_copy_crc(void *dst, const void *src, size_t length, uint32_t *crc) {
#if defined(__x86_64__)
    pthread_once(&once, init);
    if (have_sse42) {
        *crc = ~hw_copy(~*crc, src, length, dst);
        return;
    }
#endif
    char *d = dst;
    const char *s = src;
    while (length) { /* copy a chunk, then take its crc while it is in cache */
        size_t n = length < COPY_CHUNK ? length : COPY_CHUNK;
        memcpy(d, s, n);
        *crc = tfem_crc32c(*crc, d, n);
        d += n;
        s += n;
        length -= n;
    }
}
