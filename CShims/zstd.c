// libzstd for the multifd channels. <zstd.h> is included here only, so
// Swift sees opaque contexts and plain functions (see CShims.h).
#include "CShims.h"

#include <stdlib.h>
#include <zstd.h>

struct lm_zstd_cctx {
    ZSTD_CCtx *cctx;
};

struct lm_zstd_dctx {
    ZSTD_DCtx *dctx;
};

int lm_zstd_min_level(void) { return ZSTD_minCLevel(); }
int lm_zstd_max_level(void) { return ZSTD_maxCLevel(); }
size_t lm_zstd_compress_bound(size_t size) { return ZSTD_compressBound(size); }
const char *lm_zstd_version(void) { return ZSTD_versionString(); }
bool lm_zstd_is_error(size_t result) { return ZSTD_isError(result) != 0; }
const char *lm_zstd_error_name(size_t result) { return ZSTD_getErrorName(result); }

lm_zstd_cctx *lm_zstd_cctx_create(int level) {
    lm_zstd_cctx *z = malloc(sizeof(*z));
    if (!z) return NULL;
    z->cctx = ZSTD_createCCtx();
    // Sticky parameters: set once, used by every ZSTD_compress2 call. The
    // content size goes into each frame header (the default, said here
    // because the receiver checks it before it decodes).
    if (!z->cctx || ZSTD_isError(ZSTD_CCtx_setParameter(z->cctx, ZSTD_c_compressionLevel, level)) ||
        ZSTD_isError(ZSTD_CCtx_setParameter(z->cctx, ZSTD_c_contentSizeFlag, 1))) {
        ZSTD_freeCCtx(z->cctx);
        free(z);
        return NULL;
    }
    return z;
}

void lm_zstd_cctx_destroy(lm_zstd_cctx *z) {
    if (!z) return;
    ZSTD_freeCCtx(z->cctx);
    free(z);
}

size_t lm_zstd_compress(lm_zstd_cctx *z, void *dst, size_t dst_cap, const void *src, size_t src_len) {
    // ZSTD_compress2 starts a new frame each call (ZSTD_e_end) and keeps
    // the context's workspace: no allocation once the first packet sized it.
    return ZSTD_compress2(z->cctx, dst, dst_cap, src, src_len);
}

size_t lm_zstd_cctx_size(const lm_zstd_cctx *z) { return ZSTD_sizeof_CCtx(z->cctx); }

lm_zstd_dctx *lm_zstd_dctx_create(void) {
    lm_zstd_dctx *z = malloc(sizeof(*z));
    if (!z) return NULL;
    z->dctx = ZSTD_createDCtx();
    if (!z->dctx) {
        free(z);
        return NULL;
    }
    return z;
}

void lm_zstd_dctx_destroy(lm_zstd_dctx *z) {
    if (!z) return;
    ZSTD_freeDCtx(z->dctx);
    free(z);
}

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
    return ZSTD_decompressDCtx(z->dctx, dst, dst_cap, src, src_len);
}
