#include "keyd/master_secret.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <termios.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "core/error.hpp"

namespace colcrypt::keyd {
namespace {

constexpr size_t kMaxPasswordSize = 4096;

// Reads a small secret file into secret memory after checking that nobody
// but its owner (keyd's euid or root) can access it.
SecretBytes read_secret_file(const std::string& path, const char* what, size_t max_size) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) {
    int err = errno;
    throw Error(err == ENOENT || err == EACCES ? Errc::InvalidArgument : Errc::Io,
                std::string("cannot open ") + what + " " + path + ": " + std::strerror(err));
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(Errc::InvalidArgument, std::string(what) + " " + path + " is not a regular file");
  }
  if ((st.st_mode & 077) != 0 || (st.st_uid != ::geteuid() && st.st_uid != 0)) {
    ::close(fd);
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
    throw Error(
        Errc::InsecurePermissions,
        std::string(what) + " " + path + " has mode " + mode + " and owner uid " +
            std::to_string(st.st_uid) +
            "; it must be owned by colcrypt-keyd's user or root and have mode 0600 or 0400");
  }
  if (static_cast<size_t>(st.st_size) > max_size) {
    ::close(fd);
    throw Error(Errc::InvalidArgument, std::string(what) + " " + path + " is too large");
  }
  SecretBytes buf(max_size + 1);
  size_t got = 0;
  for (;;) {
    ssize_t n = ::read(fd, buf.data() + got, buf.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int err = errno;
      ::close(fd);
      throw Error(Errc::Io,
                  std::string("cannot read ") + what + " " + path + ": " + std::strerror(err));
    }
    if (n == 0) break;
    got += static_cast<size_t>(n);
    if (got > max_size) {
      ::close(fd);
      throw Error(Errc::InvalidArgument, std::string(what) + " " + path + " is too large");
    }
  }
  ::close(fd);
  return SecretBytes(buf.data(), got);
}

SecretBytes strip_newline(SecretBytes s) {
  size_t n = s.size();
  if (n > 0 && s.data()[n - 1] == '\n') --n;
  if (n > 0 && s.data()[n - 1] == '\r') --n;
  if (n == s.size()) return s;
  return SecretBytes(s.data(), n);
}

SecretBytes read_line_no_echo(const std::string& prompt) {
  struct termios saved {};
  bool restore = ::tcgetattr(STDIN_FILENO, &saved) == 0;
  if (restore) {
    struct termios quiet = saved;
    quiet.c_lflag &= ~static_cast<tcflag_t>(ECHO);
    quiet.c_lflag |= ECHONL;
    ::tcsetattr(STDIN_FILENO, TCSAFLUSH, &quiet);
  }
  // The prompt comes after echo is off, so nothing typed after it is echoed or flushed.
  std::fputs(prompt.c_str(), stderr);
  std::fflush(stderr);
  SecretBytes buf(kMaxPasswordSize);
  size_t got = 0;
  bool eol = false;
  while (!eol) {
    char c;
    ssize_t n = ::read(STDIN_FILENO, &c, 1);
    if (n < 0 && errno == EINTR) {
      // A signal (Ctrl-C, SIGTERM) abandons the prompt; the terminal is restored.
      if (restore) ::tcsetattr(STDIN_FILENO, TCSAFLUSH, &saved);
      std::fputs("\n", stderr);
      throw Error(Errc::InvalidArgument, "interrupted while reading the master password");
    }
    if (n <= 0) break;
    if (c == '\n' || c == '\r') {
      eol = true;
    } else if (got < buf.size()) {
      buf.data()[got++] = static_cast<uint8_t>(c);
    }
    secure_zero(&c, 1);
  }
  if (restore) ::tcsetattr(STDIN_FILENO, TCSAFLUSH, &saved);
  if (!eol && got == 0) throw Error(Errc::InvalidArgument, "no master password entered");
  return SecretBytes(buf.data(), got);
}

}  // namespace

MasterSecret read_master_key_file(const std::string& path) {
  MasterSecret secret;
  secret.kind = MasterSecret::Kind::KeyFile;
  secret.bytes = read_secret_file(path, "master key file", 4096);
  if (secret.bytes.size() != AeadKey::kKeySize) {
    throw Error(Errc::InvalidArgument, "master key file " + path +
                                           " must hold exactly 32 raw bytes (it holds " +
                                           std::to_string(secret.bytes.size()) + ")");
  }
  return secret;
}

MasterSecret read_password_file(const std::string& path) {
  MasterSecret secret;
  secret.kind = MasterSecret::Kind::Password;
  secret.bytes = strip_newline(read_secret_file(path, "password file", kMaxPasswordSize));
  if (secret.bytes.empty()) {
    throw Error(Errc::InvalidArgument, "password file " + path + " is empty");
  }
  return secret;
}

std::optional<MasterSecret> take_password_from_env() {
  char* value = std::getenv(kPasswordEnvVar);
  if (!value) return std::nullopt;
  MasterSecret secret;
  secret.kind = MasterSecret::Kind::Password;
  secret.bytes = SecretBytes(reinterpret_cast<const uint8_t*>(value), std::strlen(value));
  scrub_password_env();
  if (secret.bytes.empty()) {
    throw Error(Errc::InvalidArgument, std::string(kPasswordEnvVar) + " is empty");
  }
  return secret;
}

void scrub_password_env() {
  // The value lives in the process's environment block (and so in
  // /proc/PID/environ): wipe it in place before dropping the variable.
  if (char* value = std::getenv(kPasswordEnvVar)) secure_zero(value, std::strlen(value));
  ::unsetenv(kPasswordEnvVar);
}

MasterSecret prompt_password(const std::string& prompt, bool confirm) {
  MasterSecret secret;
  secret.kind = MasterSecret::Kind::Password;
  secret.bytes = read_line_no_echo(prompt);
  if (secret.bytes.empty()) throw Error(Errc::InvalidArgument, "the master password is empty");
  if (confirm) {
    SecretBytes again = read_line_no_echo("Repeat the master password: ");
    if (!constant_time_equal(secret.bytes.view(), again.view())) {
      throw Error(Errc::InvalidArgument, "the two passwords differ");
    }
  }
  return secret;
}

MasterSecret choose_master_secret(const std::string& master_key_file,
                                  const std::string& password_file,
                                  std::optional<MasterSecret>& env_password,
                                  const std::string& prompt, bool confirm) {
  if (!password_file.empty() && !master_key_file.empty()) {
    throw Error(Errc::InvalidArgument, "--password-file and --master-key-file exclude each other");
  }
  if (!master_key_file.empty()) return read_master_key_file(master_key_file);
  if (!password_file.empty()) return read_password_file(password_file);
  if (env_password) {
    MasterSecret secret = std::move(*env_password);
    env_password.reset();
    return secret;
  }
  if (::isatty(STDIN_FILENO)) return prompt_password(prompt, confirm);
  throw Error(Errc::InvalidArgument,
              std::string("no master secret: use --master-key-file, --password-file or ") +
                  kPasswordEnvVar + " (or run on a terminal to be asked)");
}

}  // namespace colcrypt::keyd
