// Page copies for a paged optimizer's side stream: whole pages of bytes
// moved between a packed buffer and their places in a larger one, in one
// launch instead of one copy call per page.
#include "common.cuh"

// gather: dst page i = src page index[i]; scatter: dst page index[i] = src
// page i. With `vec`, pages are a multiple of 16 bytes and both buffers
// 16-byte aligned, and 16-byte words are moved; else single bytes.
template <class W>
__device__ __forceinline__ void copy_words(const W* __restrict__ src, W* __restrict__ dst, const i64* __restrict__ index,
                                           i64 n_pages, i64 words, bool gather) {
    const i64 total = n_pages * words;
    for (i64 w = (i64)blockIdx.x * blockDim.x + threadIdx.x; w < total; w += (i64)gridDim.x * blockDim.x) {
        const i64 page = w / words, off = w - page * words;
        const i64 other = index[page];
        if (gather) dst[page * words + off] = src[other * words + off];
        else dst[other * words + off] = src[page * words + off];
    }
}

extern "C" __global__ void __launch_bounds__(256) copy_pages(const u8* src, u8* dst, const i64* index,
                                                             i64 n_pages, i64 page_bytes, int gather, int vec) {
    if (vec)
        copy_words<uint4>(reinterpret_cast<const uint4*>(src), reinterpret_cast<uint4*>(dst), index, n_pages,
                          page_bytes / 16, gather);
    else
        copy_words<u8>(src, dst, index, n_pages, page_bytes, gather);
}
