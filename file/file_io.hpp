// The file side of colcrypt-file: reading IN, writing OUT so that a named
// OUT appears whole or not at all, and the copy under a rewrap.
#pragma once
#include <sys/types.h>

#include <csignal>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>

namespace colcrypt::file {

// Set by SIGINT / SIGTERM; reads and writes check it and throw Errc::Cancelled.
extern volatile std::sig_atomic_t g_interrupted;
void install_signal_handlers();

// An input: a file or "-" (stdin). Throws Errc::Io.
class Input {
 public:
  explicit Input(const std::string& path);
  ~Input();
  Input(const Input&) = delete;
  Input& operator=(const Input&) = delete;
  // Up to n bytes, 0 at the end of the input.
  size_t read(uint8_t* buffer, size_t n);
  int fd() const { return fd_; }
  const std::string& name() const { return name_; }
  // The size of a regular file, for the progress display.
  std::optional<uint64_t> size() const { return size_; }
  // The permission bits of a file (none for a pipe or terminal).
  std::optional<mode_t> mode() const { return mode_; }
  // The owner and group of a file (none for a pipe or terminal).
  struct Owner {
    uid_t uid;
    gid_t gid;
  };
  std::optional<Owner> owner() const { return owner_; }

 private:
  int fd_ = -1;
  bool owned_ = false;
  std::string name_;
  std::optional<uint64_t> size_;
  std::optional<mode_t> mode_;
  std::optional<Owner> owner_;
};

// An output: "-" (stdout, written as it comes) or a named file written to a
// temporary file in its directory and renamed over the name by commit(),
// after fsync of the file and then of the directory. The temporary file is
// unnamed (O_TMPFILE) where the file system supports it and commit() can
// name it: through /proc/self/fd, or without /proc by linkat(AT_EMPTY_PATH),
// which needs CAP_DAC_READ_SEARCH; else it is a named file from the start.
// Destroyed without commit(), it leaves no file behind and the name
// untouched. New files get mode 0600 (or `mode`, umask aside). With `owner`
// (an in-place rewrite of someone else's file) the file gets that owner and
// group, or the constructor throws Errc::Io when it may not give them.
class Output {
 public:
  explicit Output(const std::string& path, mode_t mode = 0600,
                  std::optional<Input::Owner> owner = std::nullopt);
  ~Output();
  Output(const Output&) = delete;
  Output& operator=(const Output&) = delete;
  void write(const uint8_t* data, size_t n);
  void pwrite_at(uint64_t offset, const uint8_t* data, size_t n);
  // Copies the whole of in (a regular file) to this empty output: a reflink
  // where the file system allows it (no data copied), else a copy in the
  // kernel (copy_file_range), else through a buffer.
  void clone_from(const Input& in);
  void commit();
  bool is_stdout() const { return fd_ == 1 && !owned_; }

 private:
  int fd_ = -1;
  bool owned_ = false;
  std::string path_;           // OUT
  std::string dir_;            // OUT's directory
  std::string tmp_name_;       // the named temporary file (no O_TMPFILE), or empty
  bool link_by_proc_ = false;  // O_TMPFILE named through /proc (else AT_EMPTY_PATH)
  bool committed_ = false;
};

// Whether a and b name the same file (both exist).
bool same_file(const std::string& a, const std::string& b);

}  // namespace colcrypt::file
