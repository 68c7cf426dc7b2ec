// Every fuzz target's seed corpus and every committed regression input
// (fuzz/corpus/TARGET, fuzz/regressions/TARGET) replayed through the same
// property check the libFuzzer binaries run (fuzz/checks.hpp), in the
// ordinary build: a fixed crash stays fixed without clang or libFuzzer.
#include <dirent.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "checks.hpp"

namespace {

std::vector<std::string> files_in(const std::string& dir) {
  std::vector<std::string> files;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (const dirent* e = ::readdir(d)) {
      if (e->d_name[0] != '.') files.push_back(dir + "/" + e->d_name);
    }
    ::closedir(d);
  }
  std::sort(files.begin(), files.end());
  return files;
}

std::vector<uint8_t> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

}  // namespace

TEST_CASE("fuzz corpora and regression inputs pass their checks", "[fuzz]") {
  size_t corpus_files = 0;
  for (const auto& target : colcrypt::fuzz::targets()) {
    for (const char* kind : {"corpus", "regressions"}) {
      const std::vector<std::string> files =
          files_in(std::string(COLCRYPT_SOURCE_DIR) + "/fuzz/" + kind + "/" + target.name);
      if (std::string(kind) == "corpus") {
        INFO("target " << target.name << " has no seed corpus");
        CHECK(!files.empty());
        corpus_files += files.size();
      }
      for (const std::string& file : files) {
        const std::vector<uint8_t> data = read_file(file);
        INFO(file);
        CHECK(target.check(data.data(), data.size()));
      }
    }
  }
  CHECK(corpus_files >= colcrypt::fuzz::targets().size());
}
