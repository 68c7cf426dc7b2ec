// The libFuzzer entry point of one target; CMake compiles it once per target
// with COLCRYPT_FUZZ_CHECK naming the check (checks.hpp).
#include <cstdio>
#include <cstdlib>

#include "checks.hpp"

#ifndef COLCRYPT_FUZZ_CHECK
#error "COLCRYPT_FUZZ_CHECK must name a check of checks.hpp"
#endif

#define COLCRYPT_STR2(x) #x
#define COLCRYPT_STR(x) COLCRYPT_STR2(x)

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (!colcrypt::fuzz::COLCRYPT_FUZZ_CHECK(data, size)) {
    std::fprintf(stderr, "colcrypt fuzz: property of %s failed on this input\n",
                 COLCRYPT_STR(COLCRYPT_FUZZ_CHECK));
    std::abort();
  }
  return 0;
}
