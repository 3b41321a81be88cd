/* Splitting a native kernel's column blocks between pthreads (int4_native.c, int4_bf16.c,
 * int4_dot.c): how many threads a call uses, and running one work item per thread. */
#ifndef INLAID_NATIVE_THREADS_H
#define INLAID_NATIVE_THREADS_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#define MAX_THREADS 64

/* The threads a call asked for, within [1, MAX_THREADS] and no more than its column blocks. */
static inline int64_t thread_count(int64_t threads, int64_t blocks) {
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    return threads > blocks ? blocks : threads;
}

/* run(works[t]) for t < count, works `stride` bytes apart: works[0] on the caller's thread,
 * each other on a pthread of its own, joined before this returns; a work whose thread could
 * not be had runs on the caller's thread after the rest. */
static inline void run_on_threads(void *(*run)(void *), void *works, size_t stride, int64_t count) {
    pthread_t helpers[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    char *base = (char *)works;
    for (int64_t t = 1; t < count; t++) started[t] = pthread_create(&helpers[t], 0, run, base + t * stride) == 0;
    run(base);
    for (int64_t t = 1; t < count; t++) {
        if (started[t])
            pthread_join(helpers[t], 0);
        else
            run(base + t * stride); /* no thread to be had: do its share here */
    }
}

#endif
