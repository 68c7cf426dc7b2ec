#include "scratch_dir.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>

namespace colcrypt::fuzz {

namespace {

std::string made_dir;

void remove_scratch_dir() {
  if (made_dir.empty()) return;
  if (DIR* d = ::opendir(made_dir.c_str())) {
    while (const dirent* e = ::readdir(d)) {
      const std::string name = e->d_name;
      if (name != "." && name != "..") ::unlink((made_dir + "/" + name).c_str());
    }
    ::closedir(d);
  }
  ::rmdir(made_dir.c_str());
}

}  // namespace

const std::string& scratch_dir() {
  if (made_dir.empty()) {
    const char* tmp = std::getenv("TMPDIR");
    std::string pattern =
        std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/colcrypt-fuzz-XXXXXX";
    if (::mkdtemp(pattern.data()) == nullptr) {
      std::perror("colcrypt fuzz: mkdtemp");
      std::abort();
    }
    made_dir = pattern;
    std::atexit(remove_scratch_dir);
  }
  return made_dir;
}

void write_scratch_file(const std::string& name, const std::string& data) {
  const std::string path = scratch_dir() + "/" + name;
  ::unlink(path.c_str());
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) {
    std::perror("colcrypt fuzz: open");
    std::abort();
  }
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n <= 0) {
      std::perror("colcrypt fuzz: write");
      std::abort();
    }
    done += static_cast<size_t>(n);
  }
  ::close(fd);
}

std::string read_scratch_file(const std::string& name) {
  std::ifstream in(scratch_dir() + "/" + name, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

void remove_scratch_file(const std::string& name) {
  ::unlink((scratch_dir() + "/" + name).c_str());
}

}  // namespace colcrypt::fuzz
