// libzstd for the multifd channels. <zstd.h> is included here only, so
// Swift sees opaque contexts and plain functions (see CShims.h).
#include "CShims.h"

#include <zstd.h>

// The opaque handles Swift holds are libzstd's own contexts: an
// lm_zstd_cctx * is a ZSTD_CCtx *, an lm_zstd_dctx * a ZSTD_DCtx *.
static ZSTD_CCtx *cctx(lm_zstd_cctx *z) { return (ZSTD_CCtx *)z; }
static ZSTD_DCtx *dctx(lm_zstd_dctx *z) { return (ZSTD_DCtx *)z; }

int lm_zstd_min_level(void) { return ZSTD_minCLevel(); }
int lm_zstd_max_level(void) { return ZSTD_maxCLevel(); }
size_t lm_zstd_compress_bound(size_t size) { return ZSTD_compressBound(size); }
const char *lm_zstd_version(void) { return ZSTD_versionString(); }
bool lm_zstd_is_error(size_t result) { return ZSTD_isError(result) != 0; }
const char *lm_zstd_error_name(size_t result) { return ZSTD_getErrorName(result); }

lm_zstd_cctx *lm_zstd_cctx_create(int level) {
    ZSTD_CCtx *c = ZSTD_createCCtx();
    // Sticky parameters: set once, used by every ZSTD_compress2 call. The
    // content size goes into each frame header (the default, said here
    // because the receiver checks it before it decodes), and each frame
    // ends with the XXH64 checksum of its content, which libzstd checks
    // when it decodes.
    if (!c || ZSTD_isError(ZSTD_CCtx_setParameter(c, ZSTD_c_compressionLevel, level)) ||
        ZSTD_isError(ZSTD_CCtx_setParameter(c, ZSTD_c_contentSizeFlag, 1)) ||
        ZSTD_isError(ZSTD_CCtx_setParameter(c, ZSTD_c_checksumFlag, 1))) {
        ZSTD_freeCCtx(c);
        return NULL;
    }
    return (lm_zstd_cctx *)c;
}

void lm_zstd_cctx_destroy(lm_zstd_cctx *z) { ZSTD_freeCCtx(cctx(z)); }

size_t lm_zstd_compress(lm_zstd_cctx *z, void *dst, size_t dst_cap, const void *src, size_t src_len) {
    // ZSTD_compress2 starts a new frame each call (ZSTD_e_end) and keeps
    // the context's workspace: no allocation once the first packet sized it.
    return ZSTD_compress2(cctx(z), dst, dst_cap, src, src_len);
}

size_t lm_zstd_cctx_size(const lm_zstd_cctx *z) { return ZSTD_sizeof_CCtx((const ZSTD_CCtx *)z); }

lm_zstd_dctx *lm_zstd_dctx_create(void) { return (lm_zstd_dctx *)ZSTD_createDCtx(); }

void lm_zstd_dctx_destroy(lm_zstd_dctx *z) { ZSTD_freeDCtx(dctx(z)); }

size_t lm_zstd_frame_size(const void *src, size_t src_len) { return ZSTD_findFrameCompressedSize(src, src_len); }

uint64_t lm_zstd_frame_content_size(const void *src, size_t src_len) {
    unsigned long long n = ZSTD_getFrameContentSize(src, src_len);
    if (n == ZSTD_CONTENTSIZE_UNKNOWN) return LM_ZSTD_CONTENTSIZE_UNKNOWN;
    if (n == ZSTD_CONTENTSIZE_ERROR) return LM_ZSTD_CONTENTSIZE_ERROR;
    return n;
}

size_t lm_zstd_decompress(lm_zstd_dctx *z, void *dst, size_t dst_cap, const void *src, size_t src_len) {
    // One-shot decoding uses `dst` as its window: no buffer beyond the
    // context's own, whatever window size the frame header claims.
    return ZSTD_decompressDCtx(dctx(z), dst, dst_cap, src, src_len);
}

