// Custom Catch2 runner. The Wycheproof vectors live outside the repository;
// a run that selects only [wycheproof] tests exits 77 (CTest: SKIPPED) when
// they are missing, and says why. A run mixing them with other tests lets the
// [wycheproof] tests fail instead: missing vectors never pass silently.
#define CATCH_CONFIG_RUNNER
#include <sys/stat.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <stdexcept>
#include <string>

#include "support.hpp"

namespace colcrypt::test {

namespace {

#ifdef COLCRYPT_SOURCE_DIR
const std::string kSourceDir = COLCRYPT_SOURCE_DIR;
#else
// CMake compiles with absolute paths: <repo>/tests/unit/main.cpp.
const std::string kSourceDir = [] {
  std::string path = __FILE__;
  for (int i = 0; i < 3; ++i) {
    const size_t slash = path.rfind('/');
    path = slash == std::string::npos ? std::string(".") : path.substr(0, slash);
  }
  return path;
}();
#endif

bool is_file(const std::string& path) {
  struct stat st {};
  return stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string base_dir() {
  const char* env = std::getenv("COLCRYPT_VECTORS_DIR");
  if (env != nullptr && *env != '\0') return env;
  return kSourceDir + "/../shared/vectors";
}

}  // namespace

std::string wycheproof_dir() {
  const std::string base = base_dir();
  for (const std::string& dir : {base + "/wycheproof", base}) {
    if (is_file(dir + "/aes_gcm_test.json")) return dir;
  }
  return "";
}

std::string wycheproof_search_description() {
  const std::string base = base_dir();
  return base + "/wycheproof and " + base +
         " (set COLCRYPT_VECTORS_DIR to the directory holding aes_gcm_test.json)";
}

nlohmann::json load_wycheproof(const std::string& name) {
  const std::string dir = wycheproof_dir();
  if (dir.empty()) FAIL("Wycheproof vectors not found in " << wycheproof_search_description());
  std::ifstream in(dir + "/" + name);
  if (!in) FAIL("cannot open " << dir << "/" << name);
  nlohmann::json doc = nlohmann::json::parse(in);
  REQUIRE(doc.contains("testGroups"));
  return doc;
}

std::vector<uint8_t> unhex(const std::string& hex) {
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    throw std::invalid_argument("bad hex digit");
  };
  if (hex.size() % 2 != 0) throw std::invalid_argument("odd hex length");
  std::vector<uint8_t> out(hex.size() / 2);
  for (size_t i = 0; i < out.size(); ++i) {
    out[i] = static_cast<uint8_t>(nibble(hex[2 * i]) << 4 | nibble(hex[2 * i + 1]));
  }
  return out;
}

std::string hex(const uint8_t* data, size_t n) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string s;
  s.reserve(2 * n);
  for (size_t i = 0; i < n; ++i) {
    s.push_back(kHex[data[i] >> 4]);
    s.push_back(kHex[data[i] & 15]);
  }
  return s;
}

}  // namespace colcrypt::test

int main(int argc, char* argv[]) {
  Catch::Session session;
  if (const int rc = session.applyCommandLine(argc, argv); rc != 0) return rc;

  if (colcrypt::test::wycheproof_dir().empty()) {
    const Catch::Config& config = session.config();
    const auto selected =
        Catch::filterTests(Catch::getAllTestCasesSorted(config), config.testSpec(), config);
    auto is_wycheproof = [](const Catch::TestCase& t) {
      const auto& tags = t.lcaseTags;
      return std::find(tags.begin(), tags.end(), "wycheproof") != tags.end();
    };
    const bool any = std::any_of(selected.begin(), selected.end(), is_wycheproof);
    const bool all =
        !selected.empty() && std::all_of(selected.begin(), selected.end(), is_wycheproof);
    if (any) {
      std::fprintf(stderr, "colcrypt-unit-tests: Wycheproof vectors not found in %s\n",
                   colcrypt::test::wycheproof_search_description().c_str());
    }
    // CI always has the vectors beside the clone: there a missing folder is a
    // broken path, not a user's clone, so the tests run and fail.
    const char* ci = std::getenv("CI");
    if (all && !(ci != nullptr && std::string(ci) == "true")) {
      std::fprintf(stderr, "colcrypt-unit-tests: SKIPPED: every selected test needs them\n");
      return 77;
    }
  }
  return session.run();
}
