#include "keyd/log.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>

#include "core/error.hpp"

namespace colcrypt::keyd {
namespace {

std::atomic<LogLevel> g_level{LogLevel::Info};
std::atomic<int> g_log_fd{STDERR_FILENO};
std::string g_log_path;  // set before threads start, read by the loop only

int open_log(const std::string& path) {
  return ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOCTTY, 0640);
}

const char* level_name(LogLevel level) {
  switch (level) {
    case LogLevel::Error:
      return "ERROR";
    case LogLevel::Warning:
      return "WARNING";
    case LogLevel::Info:
      return "INFO";
    case LogLevel::Debug:
      return "DEBUG";
  }
  return "INFO";
}

}  // namespace

void set_log_level(LogLevel level) { g_level = level; }

void set_log_file(const std::string& path) {
  int fd = open_log(path);
  if (fd < 0) {
    int err = errno;
    throw Error(Errc::Io, "cannot open log file " + path + ": " + std::strerror(err));
  }
  g_log_path = path;
  g_log_fd = fd;
}

void reopen_log_file() {
  if (g_log_path.empty()) return;
  int fd = open_log(g_log_path);
  if (fd < 0) {
    int err = errno;
    log_error("cannot reopen log file " + g_log_path + ": " + std::strerror(err) +
              "; still logging to the old one");
    return;
  }
  // dup2 swaps the file under the descriptor number atomically: a thread
  // logging meanwhile writes whole lines to the old file or the new one.
  if (::dup2(fd, g_log_fd) < 0) {
    int err = errno;
    log_error("cannot reopen log file " + g_log_path + ": " + std::strerror(err));
  }
  ::close(fd);
}
LogLevel log_level() { return g_level; }

std::optional<LogLevel> parse_log_level(std::string_view text) {
  if (text == "error") return LogLevel::Error;
  if (text == "warning" || text == "warn") return LogLevel::Warning;
  if (text == "info") return LogLevel::Info;
  if (text == "debug") return LogLevel::Debug;
  return std::nullopt;
}

void log(LogLevel level, std::string_view message) {
  if (level > g_level) return;
  // One write() per line so that lines from a crashing or concurrent writer
  // never interleave; control characters are neutralized (peer-supplied text).
  std::string line = "colcrypt-keyd: ";
  line += level_name(level);
  line += ": ";
  for (char c : message) {
    line.push_back(static_cast<unsigned char>(c) < 0x20 || c == 0x7f ? '?' : c);
  }
  line.push_back('\n');
  size_t done = 0;
  while (done < line.size()) {
    ssize_t n = ::write(g_log_fd, line.data() + done, line.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    done += static_cast<size_t>(n);
  }
}

}  // namespace colcrypt::keyd
