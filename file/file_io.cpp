#include "file/file_io.hpp"

#include <fcntl.h>
#include <linux/capability.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <vector>

#include "core/error.hpp"
#include "core/secure_memory.hpp"

namespace colcrypt::file {

volatile std::sig_atomic_t g_interrupted = 0;

namespace {

void on_signal(int) { g_interrupted = 1; }

[[noreturn]] void io_error(const std::string& what, int err) {
  throw Error(Errc::Io, what + ": " + std::strerror(err));
}

void check_interrupted() {
  if (g_interrupted) throw Error(Errc::Cancelled, "interrupted");
}

std::string display(const std::string& path) { return path == "-" ? "standard input" : path; }

std::string proc_fd_path(int fd) { return "/proc/self/fd/" + std::to_string(fd); }

// Whether linkat(fd, "", ..., AT_EMPTY_PATH) may name an O_TMPFILE file:
// it needs CAP_DAC_READ_SEARCH (capget, as /proc may be missing).
bool may_link_empty_path() {
  __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3] = {};
  if (::syscall(SYS_capget, &header, data) != 0) return false;
  return (data[CAP_DAC_READ_SEARCH / 32].effective & (1u << (CAP_DAC_READ_SEARCH % 32))) != 0;
}

std::string dir_of(const std::string& path) {
  const auto slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

void fsync_dir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) io_error("cannot open directory " + dir, errno);
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) io_error("cannot sync directory " + dir, err);
}

}  // namespace

void install_signal_handlers() {
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;  // no SA_RESTART: a blocked read returns EINTR and sees the flag
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGHUP, &sa, nullptr);
  // A closed pipe downstream is an I/O error (EPIPE), reported and exited on.
  std::signal(SIGPIPE, SIG_IGN);
}

Input::Input(const std::string& path) : name_(display(path)) {
  if (path == "-") {
    fd_ = 0;
  } else {
    fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd_ < 0) io_error("cannot open " + path, errno);
    owned_ = true;
  }
  struct stat st {};
  if (::fstat(fd_, &st) == 0) {
    if (S_ISDIR(st.st_mode)) {
      if (owned_) ::close(fd_);
      throw Error(Errc::Io, path + " is a directory");
    }
    if (S_ISREG(st.st_mode)) {
      size_ = static_cast<uint64_t>(st.st_size);
      mode_ = st.st_mode & 07777;
      owner_ = Owner{st.st_uid, st.st_gid};
    }
  }
}

Input::~Input() {
  if (owned_) ::close(fd_);
}

size_t Input::read(uint8_t* buffer, size_t n) {
  for (;;) {
    check_interrupted();
    const ssize_t r = ::read(fd_, buffer, n);
    if (r >= 0) return static_cast<size_t>(r);
    if (errno != EINTR) io_error("cannot read " + name_, errno);
  }
}

Output::Output(const std::string& path, mode_t mode, std::optional<Input::Owner> owner)
    : path_(path) {
  if (path == "-") {
    fd_ = 1;
    return;
  }
  dir_ = dir_of(path);
  fd_ = ::open(dir_.c_str(), O_TMPFILE | O_WRONLY | O_CLOEXEC, mode);
  if (fd_ >= 0) {
    link_by_proc_ = ::access(proc_fd_path(fd_).c_str(), F_OK) == 0;
    if (!link_by_proc_ && !may_link_empty_path()) {
      // commit() could not name it: a named temporary file instead.
      ::close(fd_);
      fd_ = -1;
    }
  }
  if (fd_ < 0) {
    const auto slash = path.rfind('/');
    const std::string base = slash == std::string::npos ? path : path.substr(slash + 1);
    std::string tmpl = dir_ + "/." + base + ".colcrypt-XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    fd_ = ::mkostemp(buf.data(), O_CLOEXEC);
    if (fd_ < 0) io_error("cannot create a temporary file in " + dir_, errno);
    tmp_name_ = buf.data();
  }
  owned_ = true;
  try {
    // The owner first: a change of owner clears the set-id bits of the mode.
    if (owner && ::fchown(fd_, owner->uid, owner->gid) != 0) {
      const int err = errno;
      throw Error(Errc::Io, "cannot keep the owner (uid " + std::to_string(owner->uid) + ", gid " +
                                std::to_string(owner->gid) + ") of " + path_ + ": " +
                                std::strerror(err) + "; run this as its owner or as root");
    }
    // Explicitly: the umask applied to the mode given to open().
    if (::fchmod(fd_, mode) != 0) io_error("cannot set the mode of the new " + path_, errno);
  } catch (...) {
    ::close(fd_);  // no destructor runs for a constructor that throws
    if (!tmp_name_.empty()) ::unlink(tmp_name_.c_str());
    throw;
  }
}

Output::~Output() {
  if (!owned_) return;
  ::close(fd_);
  if (!committed_ && !tmp_name_.empty()) ::unlink(tmp_name_.c_str());
}

void Output::write(const uint8_t* data, size_t n) {
  while (n > 0) {
    check_interrupted();
    const ssize_t w = ::write(fd_, data, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      io_error("cannot write " + (owned_ ? path_ : std::string("standard output")), errno);
    }
    data += w;
    n -= static_cast<size_t>(w);
  }
}

void Output::pwrite_at(uint64_t offset, const uint8_t* data, size_t n) {
  while (n > 0) {
    const ssize_t w = ::pwrite(fd_, data, n, static_cast<off_t>(offset));
    if (w < 0) {
      if (errno == EINTR) continue;
      io_error("cannot write " + path_, errno);
    }
    data += w;
    n -= static_cast<size_t>(w);
    offset += static_cast<uint64_t>(w);
  }
}

void Output::clone_from(const Input& in) {
  if (!owned_ || !in.size()) throw Error(Errc::Internal, "clone_from needs two files");
  if (::ioctl(fd_, FICLONE, in.fd()) == 0) return;
  const uint64_t size = *in.size();
  loff_t from = 0, to = 0;
  while (static_cast<uint64_t>(from) < size) {
    check_interrupted();
    const ssize_t c = ::copy_file_range(in.fd(), &from, fd_, &to, size - from, 0);
    if (c > 0) continue;
    if (c == 0) throw Error(Errc::Io, in.name() + " shrank while it was copied");
    if (errno == EINTR) continue;
    if (from != 0 || (errno != EXDEV && errno != ENOSYS && errno != EOPNOTSUPP && errno != EINVAL))
      io_error("cannot copy " + in.name(), errno);
    // copy_file_range cannot do these two files: through a buffer.
    std::vector<uint8_t> buffer(1 << 20);
    while (static_cast<uint64_t>(from) < size) {
      check_interrupted();
      const ssize_t r = ::pread(in.fd(), buffer.data(), buffer.size(), from);
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) io_error("cannot read " + in.name(), errno);
      if (r == 0) throw Error(Errc::Io, in.name() + " shrank while it was copied");
      write(buffer.data(), static_cast<size_t>(r));
      from += r;
    }
  }
}

void Output::commit() {
  if (!owned_) return;  // stdout: nothing to rename
  if (::fsync(fd_) != 0) io_error("cannot sync " + path_, errno);
  if (tmp_name_.empty()) {
    // Give the unnamed file a temporary name, then rename it over OUT
    // (linkat cannot replace an existing file).
    const std::string proc = proc_fd_path(fd_);
    for (int attempt = 0;; ++attempt) {
      uint8_t r[4];
      random_bytes(r, sizeof r);
      char suffix[16];
      std::snprintf(suffix, sizeof suffix, "%02x%02x%02x%02x", r[0], r[1], r[2], r[3]);
      const auto slash = path_.rfind('/');
      const std::string base = slash == std::string::npos ? path_ : path_.substr(slash + 1);
      const std::string name = dir_ + "/." + base + ".colcrypt-" + suffix;
      const int rc = link_by_proc_ ? ::linkat(AT_FDCWD, proc.c_str(), AT_FDCWD, name.c_str(),
                                              AT_SYMLINK_FOLLOW)
                                   : ::linkat(fd_, "", AT_FDCWD, name.c_str(), AT_EMPTY_PATH);
      if (rc == 0) {
        tmp_name_ = name;
        break;
      }
      if (errno != EEXIST || attempt > 100) io_error("cannot create " + path_, errno);
    }
  }
  if (::rename(tmp_name_.c_str(), path_.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp_name_.c_str());
    tmp_name_.clear();
    io_error("cannot rename the temporary file to " + path_, err);
  }
  committed_ = true;
  fsync_dir(dir_);
}

bool same_file(const std::string& a, const std::string& b) {
  struct stat sa {
  }, sb{};
  if (::stat(a.c_str(), &sa) != 0 || ::stat(b.c_str(), &sb) != 0) return false;
  return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

}  // namespace colcrypt::file
