// colcrypt-bench-keycache: what the extension's per-backend key cache
// (src/pg/key_cache.cpp, the same code the backend runs: it is Postgres-free)
// holds in memory with N key versions in use, for N up to 10,000: more than
// a real keyd can be made to hold in a benchmark's time (every rotation
// rewrites its whole store, so 10,000 versions take most of an hour).
// bench/run.sh measures 1, 100 and 1,000 versions in a real backend as well.
//
// A fake keyd (tests/unit/fake_keyd.hpp) serves version v of one key; one
// value sealed under each version is decrypted through pg::decrypt_value, so
// each version becomes a cache entry exactly as in a backend. Measured by the
// allocator and the kernel, against the process before its first key:
// malloc'd bytes in use (mallinfo2: uordblks + hblkhd), anonymous resident
// memory (RssAnon) and locked memory (VmLck) from /proc/self/status.
//
//   colcrypt-bench-keycache N...    (ascending)
// prints one line per N:  keys=N heap_kb=H anon_kb=A locked_kb=L
#include <malloc.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "../tests/unit/fake_keyd.hpp"
#include "core/envelope.hpp"
#include "pg/key_cache.hpp"

using namespace colcrypt;

namespace {

// Version v's key bytes: v in every byte (distinct keys, no keyd needed to seal).
SecretBytes key_of(uint32_t version) {
  SecretBytes key(AeadKey::kKeySize);
  std::memset(key.data(), static_cast<int>(version * 7 + 1), key.size());
  std::memcpy(key.data(), &version, sizeof version);
  return key;
}

long status_kb(const char* field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  const size_t n = std::strlen(field);
  while (std::getline(in, line)) {
    if (line.compare(0, n, field) == 0 && line.size() > n && line[n] == ':') {
      return std::atol(line.c_str() + n + 1);
    }
  }
  return -1;
}

long heap_kb() {
  const struct mallinfo2 m = mallinfo2();
  return static_cast<long>((m.uordblks + m.hblkhd) / 1024);
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<uint32_t> counts;
  for (int i = 1; i < argc; ++i) {
    const long n = std::atol(argv[i]);
    if (n <= 0 || n > 1000000 || (!counts.empty() && static_cast<uint32_t>(n) <= counts.back())) {
      std::fprintf(stderr, "usage: %s N... (ascending, 1 to 1,000,000)\n", argv[0]);
      return 2;
    }
    counts.push_back(static_cast<uint32_t>(n));
  }
  if (counts.empty()) {
    std::fprintf(stderr, "usage: %s N... (ascending, 1 to 1,000,000)\n", argv[0]);
    return 2;
  }
  const KeyId id = {0x42, 0x10, 0x99, 0x01, 0x5e, 0x6f, 0x40, 0x11,
                    0x82, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99};
  test::FakeKeyd keyd([&](const wire::Frame& f) -> test::Answer {
    if (f.type != wire::MsgType::FetchVersion) {
      return wire::encode_failure(wire::FailureCode::BadRequest, "unexpected request");
    }
    KeyId asked{};
    uint32_t version = 0;
    wire::decode_fetch_version(ByteView(f.body), asked, version);
    wire::KeyReply r;
    r.id = asked;
    r.version = version;
    r.state = wire::KeyState::Active;
    r.name = "bench_mem_key";
    r.key = key_of(version);
    SecretBytes frame = wire::encode_key_reply(r);
    return std::vector<uint8_t>(frame.data(), frame.data() + frame.size());
  });

  // The values first, so that their memory is in the baseline.
  const ByteView plaintext = ByteView::of("123456789");
  std::vector<std::vector<uint8_t>> values(counts.back());
  for (uint32_t v = 1; v <= counts.back(); ++v) {
    AeadKey key(key_of(v).view());
    values[v - 1].resize(sealed_size(plaintext.size));
    seal(key, id, v, PayloadType::Text, ByteView(), plaintext, values[v - 1].data());
  }
  const std::string path = keyd.path();
  pg::KeydSettings settings;
  settings.socket_path = path.c_str();
  settings.timeout_ms = 10000;
  settings.cache_ttl_s = 3600;
  uint8_t out[16];

  malloc_trim(0);
  const long heap0 = heap_kb(), anon0 = status_kb("RssAnon"), locked0 = status_kb("VmLck");
  uint32_t done = 0;
  for (uint32_t n : counts) {
    for (; done < n; ++done) {
      const ByteView value(values[done]);
      pg::decrypt_value(settings, parse_header(value), value, ByteView(), out);
    }
    if (std::memcmp(out, "123456789", 9) != 0) {
      std::fprintf(stderr, "colcrypt-bench-keycache: a value decrypted wrongly\n");
      return 1;
    }
    std::printf("keys=%u heap_kb=%ld anon_kb=%ld locked_kb=%ld\n", n, heap_kb() - heap0,
                status_kb("RssAnon") - anon0, status_kb("VmLck") - locked0);
    std::fflush(stdout);
  }
  pg::clear_key_cache();
  return 0;
}
