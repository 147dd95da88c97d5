// Content hashes for integrity checks: XXH3 from libxxhash, through its
// run-time dispatcher (AVX-512, AVX2 or SSE2, whichever the CPU has).
// <xxhash.h> is included here only, so Swift sees plain functions.
#include "CShims.h"

#include <xxh_x86dispatch.h>

uint64_t lm_hash64(const void *p, size_t length) { return XXH3_64bits_dispatch(p, length); }

void lm_hash128(const void *p, size_t length, uint8_t out[16]) {
    XXH128_hash_t h = XXH3_128bits_dispatch(p, length);
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, h);
    for (int i = 0; i < 16; i++) out[i] = c.digest[i];
}
