// The receiver's placement with the content hash folded into the copy
// (lm_place_pages_hashed). A file of its own: it takes XXH3's constants and
// final merge from <xxhash.h> as static inline copies (XXH_INLINE_ALL),
// which cannot share a file with hash.c's dispatcher.
#include "CShims.h"

#define XXH_INLINE_ALL
#include <xxhash.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

// ----------------------------------
//
// XXH3-64 of an input longer than 240 bytes (XXH3's "long" path, default
// secret, no seed) is, per 64-byte stripe k of the input, an update of
// eight 64-bit accumulators with the stripe and 64 bytes of the secret at
// 8 * (k mod 16); after every 16 stripes (a block) the accumulators are
// scrambled; the stripe that ends the input is taken with the secret at
// 192 - 64 - 7, and the last block's stripes before it as usual; finally
// the accumulators are merged with the secret at 11 and the length.
// For a page (a multiple of 64 bytes) each stripe is taken exactly once,
// in order, so one pass can load a stripe, store it to its destination and
// feed it to the accumulators: the hash rides on the copy's loads, and the
// copy, bound by its streaming stores to cold memory, hides the
// arithmetic. Measured on this project's machine, 1 GiB in 4 KiB pages
// from a 512 KiB buffer: hash then copy 65 ms, hash and copy page by page
// 54 ms, this 41 ms, the copy alone 41 ms.

#if defined(__x86_64__)
#define LM_AVX512 __attribute__((target("avx512f")))

static const uint64_t lm_xxh3_init_acc[8] __attribute__((aligned(64))) = XXH3_INIT_ACC;

// One stripe into the accumulators (XXH3's accumulate_512).
LM_AVX512 static inline __m512i lm_xxh3_stripe(__m512i acc, __m512i data, const uint8_t *secret) {
    __m512i key = _mm512_loadu_si512((const void *)secret);
    __m512i data_key = _mm512_xor_si512(data, key);
    __m512i data_key_hi = _mm512_shuffle_epi32(data_key, (_MM_PERM_ENUM)_MM_SHUFFLE(0, 3, 0, 1));
    __m512i product = _mm512_mul_epu32(data_key, data_key_hi);
    __m512i swapped = _mm512_shuffle_epi32(data, (_MM_PERM_ENUM)_MM_SHUFFLE(1, 0, 3, 2));
    return _mm512_add_epi64(product, _mm512_add_epi64(acc, swapped));
}

// The scramble after each block (XXH3's scrambleAcc).
LM_AVX512 static inline __m512i lm_xxh3_scramble(__m512i acc, const uint8_t *secret) {
    const __m512i prime = _mm512_set1_epi32((int)XXH_PRIME32_1);
    __m512i mixed = _mm512_xor_si512(acc, _mm512_srli_epi64(acc, 47));
    __m512i keyed = _mm512_xor_si512(mixed, _mm512_loadu_si512((const void *)secret));
    __m512i keyed_hi = _mm512_shuffle_epi32(keyed, (_MM_PERM_ENUM)_MM_SHUFFLE(0, 3, 0, 1));
    return _mm512_add_epi64(_mm512_mul_epu32(keyed, prime), _mm512_slli_epi64(_mm512_mul_epu32(keyed_hi, prime), 32));
}

// Copies one page with streaming stores and returns its XXH3-64. `to` is
// 64-byte aligned (`from` best too: a load across two cache lines costs
// two); `length` is a multiple of 64 above 240.
LM_AVX512 static uint64_t lm_place_page_hashed_avx512(uint8_t *to, const uint8_t *from, size_t length) {
    const uint8_t *secret = XXH3_kSecret;
    const size_t secret_size = sizeof(XXH3_kSecret);
    const size_t stripes_per_block = (secret_size - 64) / 8;
    const size_t blocks = (length - 1) / (64 * stripes_per_block);
    __m512i acc = _mm512_load_si512((const void *)lm_xxh3_init_acc);
    size_t at = 0;
    for (size_t b = 0; b < blocks; b++) {
        for (size_t s = 0; s < stripes_per_block; s++, at += 64) {
            __m512i v = _mm512_loadu_si512((const void *)(from + at));
            _mm512_stream_si512((void *)(to + at), v);
            acc = lm_xxh3_stripe(acc, v, secret + s * 8);
        }
        acc = lm_xxh3_scramble(acc, secret + secret_size - 64);
    }
    const size_t last_stripes = ((length - 1) - at) / 64;
    for (size_t s = 0; s < last_stripes; s++, at += 64) {
        __m512i v = _mm512_loadu_si512((const void *)(from + at));
        _mm512_stream_si512((void *)(to + at), v);
        acc = lm_xxh3_stripe(acc, v, secret + s * 8);
    }
    // The input's last stripe (at == length - 64 for a multiple of 64).
    __m512i v = _mm512_loadu_si512((const void *)(from + at));
    _mm512_stream_si512((void *)(to + at), v);
    acc = lm_xxh3_stripe(acc, v, secret + secret_size - 64 - 7);
    uint64_t lanes[8] __attribute__((aligned(64)));
    _mm512_store_si512((void *)lanes, acc);
    return XXH3_mergeAccs(lanes, secret + 11, (uint64_t)length * XXH_PRIME64_1);
}
#endif

static bool lm_fused_usable(const void *base, size_t page_size) {
#if defined(__x86_64__)
    // __builtin_cpu_supports reads what the runtime's constructor found:
    // cheap, and no shared cache for the receiver threads to race on.
    return __builtin_cpu_supports("avx512f") && (uintptr_t)base % 64 == 0 && page_size % 64 == 0 && page_size > 240;
#else
    (void)base, (void)page_size;
    return false;
#endif
}

void lm_place_pages_hashed(void *base, const uint64_t *offsets, const void *pages, size_t count, size_t page_size,
                           uint64_t *hashes) {
#if defined(__x86_64__)
    if (lm_fused_usable(base, page_size)) {
        const uint8_t *from = (const uint8_t *)pages;
        for (size_t i = 0; i < count; i++, from += page_size)
            hashes[i] = lm_place_page_hashed_avx512((uint8_t *)base + offsets[i], from, page_size);
        // Streaming stores are weakly ordered: see lm_place_pages.
        _mm_sfence();
        return;
    }
#endif
    const uint8_t *from = (const uint8_t *)pages;
    for (size_t i = 0; i < count; i++, from += page_size) hashes[i] = lm_hash64(from, page_size);
    lm_place_pages(base, offsets, pages, count, page_size);
}

bool lm_place_hashing_is_fused(const void *base, size_t page_size) {
    return lm_fused_usable(base, page_size);
}
