/* bench-check.h: CHECK(x) for the CUDA kernel benches. x must be 0
 * (cudaSuccess, CUBLAS_STATUS_SUCCESS, or a false test); otherwise the
 * program says which call failed and where, and exits 1. Define BENCH_NAME
 * (the program's name) before including it. */
#ifndef DS_BENCH_CHECK_H
#define DS_BENCH_CHECK_H

#include <stdio.h>
#include <stdlib.h>

#define CHECK(x)                                                                       \
    do {                                                                               \
        if ((x) != 0) {                                                                \
            fprintf(stderr, BENCH_NAME ": %s failed at line %d\n", #x, __LINE__);      \
            exit(1);                                                                   \
        }                                                                              \
    } while (0)

#endif
