/* Sustained AVX2 int8 multiply-accumulates per cycle of one core, with the instructions the x86-64-v3 conv2d
 * kernels use (passes/vnni.py, dot_8x4_avx2_maddubs): vpmaddubsw (u8 x s8 pairs -> s16), vpmaddwd by ones
 * (s16 pairs -> s32), vpaddd into the accumulator; 32 MACs per triple, eight independent accumulators, activations broadcast from
 * memory (vpbroadcastd) as in the kernels.
 * The clock is measured on the same core with a chain of dependent imul (3 cycles each on Intel and AMD cores
 * since Haswell / Zen), so the result is per cycle of the clock the core really runs, not the nominal one.
 *
 *     gcc -O2 -mavx2 benchmarks/avx2_peak.c -o /tmp/avx2_peak && taskset -c 0 /tmp/avx2_peak
 *
 * x86_classes.py's class figure (x86-64-v3 int8: 32 MACs a cycle) assumes two vector ports that multiply
 * integers (Haswell ... Zen 3); a core with more reaches more (benchmarks/x86_classes.md, session 24). */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static double clock_ghz(void) {
    long n = 300000000, x = 1, one = 1;
    __asm__ volatile("" : "+r"(one));
    double t0 = now();
    for (long i = 0; i < n; i += 10)
        __asm__ volatile("imul %1,%0\n\timul %1,%0\n\timul %1,%0\n\timul %1,%0\n\timul %1,%0\n\t"
                         "imul %1,%0\n\timul %1,%0\n\timul %1,%0\n\timul %1,%0\n\timul %1,%0"
                         : "+r"(x) : "r"(one));
    return 3.0 * n / (now() - t0) / 1e9;
}

int main(void) {
    const long n = 100000000;
    /* as a conv2d kernel's register tile: 4 activations (4 channels each, broadcast from memory) x 2 weight
     * vectors held in registers -> 8 accumulators */
    static int act[1024];
    for (int k = 0; k < 1024; k++) act[k] = 0x01020304 * (k % 7);
    __m256i w0 = _mm256_set1_epi8(5), w1 = _mm256_set1_epi8(-2), ones = _mm256_set1_epi16(1);
    __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
    double ghz = clock_ghz();
    double t0 = now();
    for (long i = 0; i < n; i++) {
        const int *p = act + (i * 4 & 1023);
        __m256i a0 = _mm256_set1_epi32(p[0]), a1 = _mm256_set1_epi32(p[1]), a2 = _mm256_set1_epi32(p[2]),
                a3 = _mm256_set1_epi32(p[3]);
#define DOT(c, a, w) c = _mm256_add_epi32(c, _mm256_madd_epi16(_mm256_maddubs_epi16(a, w), ones))
        DOT(c0, a0, w0); DOT(c1, a0, w1); DOT(c2, a1, w0); DOT(c3, a1, w1);
        DOT(c4, a2, w0); DOT(c5, a2, w1); DOT(c6, a3, w0); DOT(c7, a3, w1);
    }
    double s = now() - t0;
    __m256i sum = _mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(c0, c1), _mm256_add_epi32(c2, c3)),
                                   _mm256_add_epi32(_mm256_add_epi32(c4, c5), _mm256_add_epi32(c6, c7)));
    double gmacs = 8.0 * 32 * n / s / 1e9;
    printf("clock %.2f GHz; AVX2 vpmaddubsw+vpmaddwd+vpaddd: %.1f GMAC/s = %.1f MACs a cycle (check %d)\n", ghz,
           gmacs, gmacs / ghz, _mm256_extract_epi32(sum, 0));
    return 0;
}
