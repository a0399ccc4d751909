/*
 * One SHA-256 compression (FIPS 180-4, section 6.2.2) with the x86 SHA
 * extensions, for the sealed frames of engine/_fastpath.pyx.
 *
 * Every tap costs at least five compressions (three to open the TAP frame,
 * two to seal its TAP_RESULT); written out in portable C each takes about
 * 0.4 us, a fifth of the engine's CPU per tap at peak. SHA256RNDS2 does two
 * rounds in one instruction, about ten times faster. The portable
 * compression stays in the .pyx: it runs wherever these instructions are
 * missing, and tests hold both against hashlib.
 *
 * The function is compiled for the "sha" and "sse4.1" targets by attribute,
 * so the extension is built without -msha and still loads on any x86-64
 * CPU; citycard_sha256_ni_supported() asks CPUID before it is ever called.
 * On other architectures both names exist and report "not supported".
 */
#ifndef CITYCARD_SHA256_X86_H
#define CITYCARD_SHA256_X86_H

#include <stdint.h>

/* The round constants (FIPS 180-4, 4.2.2), for both compressions. */
static const uint32_t citycard_sha256_k[64] __attribute__((aligned(16))) = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <cpuid.h>
#include <immintrin.h>

/* CPUID leaf 7, sub-leaf 0: EBX bit 29 is SHA. Leaf 1: ECX bit 19 is
 * SSE4.1 and bit 9 is SSSE3 (the byte shuffle that loads the block). */
#define CITYCARD_CPUID7_EBX_SHA (1u << 29)
#define CITYCARD_CPUID1_ECX_SSE41 (1u << 19)
#define CITYCARD_CPUID1_ECX_SSSE3 (1u << 9)

static int citycard_sha256_ni_supported(void)
{
    unsigned int eax, ebx, ecx, edx;
    if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx))
        return 0;
    if ((ecx & CITYCARD_CPUID1_ECX_SSE41) == 0 || (ecx & CITYCARD_CPUID1_ECX_SSSE3) == 0)
        return 0;
    if (__get_cpuid_max(0, 0) < 7)
        return 0;
    __cpuid_count(7, 0, eax, ebx, ecx, edx);
    return (ebx & CITYCARD_CPUID7_EBX_SHA) != 0;
}

/*
 * state: a, b, c, d, e, f, g, h as FIPS 180-4 numbers them; block: 64 bytes.
 *
 * SHA256RNDS2 wants the working variables as two registers, (a, b, e, f)
 * and (c, d, g, h), each with the first-named word in the highest lane;
 * the message words go four at a time (a "quad"), each plus its round
 * constant, two rounds per instruction (the low two lanes, then the high
 * two moved down). Quads 4..15 of the schedule come from the four before:
 * W[t] = sigma1(W[t-2]) + W[t-7] + sigma0(W[t-15]) + W[t-16], which
 * SHA256MSG1 (the sigma0 part), an alignr (the W[t-7] terms) and
 * SHA256MSG2 (the sigma1 part, which needs the words just made) compute.
 */
__attribute__((target("sha,sse4.1,ssse3")))
static void citycard_sha256_compress_ni(uint32_t state[8], const unsigned char block[64])
{
    /* Big-endian words to little-endian lanes. */
    const __m128i byte_swap = _mm_set_epi64x(0x0c0d0e0f08090a0bLL, 0x0405060700010203LL);
    __m128i dcba = _mm_loadu_si128((const __m128i *)&state[0]);
    __m128i hgfe = _mm_loadu_si128((const __m128i *)&state[4]);
    __m128i cdab = _mm_shuffle_epi32(dcba, 0xB1);
    __m128i efgh = _mm_shuffle_epi32(hgfe, 0x1B);
    __m128i abef = _mm_alignr_epi8(cdab, efgh, 8);
    __m128i cdgh = _mm_blend_epi16(efgh, cdab, 0xF0);
    const __m128i abef_start = abef;
    const __m128i cdgh_start = cdgh;
    __m128i quad[4];
    __m128i words;
    int i;

    for (i = 0; i < 4; i++)
        quad[i] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(block + 16 * i)), byte_swap);

#if defined(__clang__)
#pragma unroll
#elif defined(__GNUC__)
#pragma GCC unroll 16
#endif
    for (i = 0; i < 16; i++) {
        if (i >= 4) {
            /* quad[i % 4] held W[4i-16 .. 4i-13]; it becomes W[4i .. 4i+3]. */
            __m128i previous = quad[(i + 3) % 4];
            __m128i scheduled = _mm_sha256msg1_epu32(quad[i % 4], quad[(i + 1) % 4]);
            scheduled = _mm_add_epi32(scheduled, _mm_alignr_epi8(previous, quad[(i + 2) % 4], 4));
            quad[i % 4] = _mm_sha256msg2_epu32(scheduled, previous);
        }
        words = _mm_add_epi32(quad[i % 4], _mm_load_si128((const __m128i *)&citycard_sha256_k[4 * i]));
        cdgh = _mm_sha256rnds2_epu32(cdgh, abef, words);
        abef = _mm_sha256rnds2_epu32(abef, cdgh, _mm_shuffle_epi32(words, 0x0E));
    }

    abef = _mm_add_epi32(abef, abef_start);
    cdgh = _mm_add_epi32(cdgh, cdgh_start);
    /* Back to a..h in memory order. */
    __m128i feba = _mm_shuffle_epi32(abef, 0x1B);
    __m128i dchg = _mm_shuffle_epi32(cdgh, 0xB1);
    _mm_storeu_si128((__m128i *)&state[0], _mm_blend_epi16(feba, dchg, 0xF0));
    _mm_storeu_si128((__m128i *)&state[4], _mm_alignr_epi8(dchg, feba, 8));
}

#else /* not x86-64 with GCC or Clang */

static int citycard_sha256_ni_supported(void) { return 0; }

static void citycard_sha256_compress_ni(uint32_t state[8], const unsigned char block[64])
{
    (void)state;
    (void)block;
}

#endif

#endif /* CITYCARD_SHA256_X86_H */
