/*
 * Linked into each module of the sanitizer build only (tests/fuzz/build.py): where the
 * module's coverage counters and PC table are, so tests/fuzz/targets.py can register them
 * with atheris's libFuzzer. The module's own constructor registers them with whatever
 * __sanitizer_cov_8bit_counters_init it binds to first, and with libasan preloaded that
 * is libasan's do-nothing one.
 */
#include <stdint.h>

extern uint8_t __start___sancov_cntrs[] __attribute__((weak, visibility("hidden")));
extern uint8_t __stop___sancov_cntrs[] __attribute__((weak, visibility("hidden")));
extern uintptr_t __start___sancov_pcs[] __attribute__((weak, visibility("hidden")));
extern uintptr_t __stop___sancov_pcs[] __attribute__((weak, visibility("hidden")));

/* out[0..1]: the counters [start, stop); out[2..3]: the PC table; all NULL without coverage */
__attribute__((visibility("default"))) void stcp_fuzz_sancov(void **out) {
    out[0] = __start___sancov_cntrs;
    out[1] = __stop___sancov_cntrs;
    out[2] = __start___sancov_pcs;
    out[3] = __stop___sancov_pcs;
}
