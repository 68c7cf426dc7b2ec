#include "keyd/store_file.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "core/kdf.hpp"
#include "keyd/store_format.hpp"

namespace colcrypt::keyd {
namespace {

using nlohmann::json;
using namespace store_format;

constexpr const char* kFormatName = "colcrypt-keystore";
constexpr uint32_t kStoreFormatVersion = 1;
constexpr size_t kMaxStoreFileSize = 64u << 20;

std::string errno_text(int err) { return std::strerror(err); }

std::string join_path(const std::string& dir, const char* name) {
  if (!dir.empty() && dir.back() == '/') return dir + name;
  return dir + "/" + name;
}

void check_private(const std::string& path, bool is_dir) {
  struct stat st {};
  int rc = is_dir ? ::stat(path.c_str(), &st) : ::lstat(path.c_str(), &st);
  if (rc != 0) {
    int err = errno;
    throw Error(Errc::Io, "cannot stat " + path + ": " + errno_text(err));
  }
  const char* what = is_dir ? "store directory " : "store file ";
  if (is_dir ? !S_ISDIR(st.st_mode) : !S_ISREG(st.st_mode)) {
    throw Error(
        Errc::InsecurePermissions,
        std::string(what) + path + (is_dir ? " is not a directory" : " is not a regular file"));
  }
  if (st.st_uid != ::geteuid()) {
    throw Error(Errc::InsecurePermissions,
                std::string(what) + path + " is owned by uid " + std::to_string(st.st_uid) +
                    ", not by colcrypt-keyd's uid " + std::to_string(::geteuid()));
  }
  if ((st.st_mode & 077) != 0) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
    throw Error(Errc::InsecurePermissions, std::string(what) + path + " has mode " + mode +
                                               "; group and others must have no access (chmod " +
                                               (is_dir ? "700 " : "600 ") + path + ")");
  }
}

int open_and_lock_dir(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    throw Error(Errc::Io, "cannot open store directory " + dir + ": " + errno_text(err));
  }
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    int err = errno;
    ::close(fd);
    if (err == EWOULDBLOCK) {
      throw StoreInUse("key store " + dir + " is in use by another colcrypt-keyd");
    }
    throw Error(Errc::Io, "cannot lock store directory " + dir + ": " + errno_text(err));
  }
  return fd;
}

void remove_stale_temp(const std::string& dir) {
  std::string tmp = join_path(dir, kStoreTempFileName);
  if (::unlink(tmp.c_str()) != 0 && errno != ENOENT) {
    int err = errno;
    throw Error(Errc::Io, "cannot remove stale " + tmp + ": " + errno_text(err));
  }
}

std::string read_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) {
    int err = errno;
    throw Error(Errc::Io, "cannot open key store " + path + ": " + errno_text(err));
  }
  std::string data;
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      int err = errno;
      ::close(fd);
      throw Error(Errc::Io, "cannot read key store " + path + ": " + errno_text(err));
    }
    if (n == 0) break;
    data.append(buf, static_cast<size_t>(n));
    if (data.size() > kMaxStoreFileSize) {
      ::close(fd);
      corrupt(path, "file is larger than " + std::to_string(kMaxStoreFileSize) + " bytes");
    }
  }
  ::close(fd);
  return data;
}

void write_all(int fd, const std::string& data) {
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw errno;
    done += static_cast<size_t>(n);
  }
}

}  // namespace

bool file_store_exists(const std::string& dir) {
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0) {
    int err = errno;
    if (err == ENOENT) return false;
    throw Error(Errc::Io, "cannot stat store directory " + dir + ": " + errno_text(err));
  }
  if (!S_ISDIR(st.st_mode)) {
    throw Error(Errc::InvalidArgument, "store path " + dir + " is not a directory");
  }
  std::string file = join_path(dir, kStoreFileName);
  if (::lstat(file.c_str(), &st) == 0) return true;
  DIR* d = ::opendir(dir.c_str());
  if (!d) {
    int err = errno;
    throw Error(Errc::Io, "cannot list store directory " + dir + ": " + errno_text(err));
  }
  std::string other;
  while (struct dirent* e = ::readdir(d)) {
    std::string_view name = e->d_name;
    if (name == "." || name == ".." || name == kStoreTempFileName) continue;
    other = std::string(name);
    break;
  }
  ::closedir(d);
  if (!other.empty()) {
    throw Error(Errc::InvalidArgument, "store directory " + dir + " has files (" + other +
                                           ") but no " + kStoreFileName +
                                           "; refusing to initialize a key store there");
  }
  return false;
}

std::string signed_store_text(nlohmann::json doc, ByteView mac_key) {
  doc.erase("mac");
  doc.erase("checksum");
  doc["mac"] = to_hex(ByteView(hmac_sha256(mac_key, ByteView::of(doc.dump()))));
  doc["checksum"] = to_hex(ByteView(sha256(doc.dump())));
  return doc.dump(2) + "\n";
}

std::string store_file_text(const KekParams& params, const std::vector<KeyRecord>& keys,
                            bool exact_usage, ByteView kek, const AuditMark& mark) {
  json jkek;
  if (params.source == MasterSecret::Kind::Password) {
    jkek = {{"source", "password"},
            {"kdf", "PBKDF2-HMAC-SHA256"},
            {"iterations", params.iterations},
            {"salt", to_hex(ByteView(params.salt))}};
  } else {
    jkek = {{"source", "keyfile"}};
  }
  json jkeys = json::array();
  for (const auto& k : keys) jkeys.push_back(key_to_json(k, exact_usage));
  json doc = {{"format", kFormatName},
              {"format_version", kStoreFormatVersion},
              {"kek", std::move(jkek)},
              {"kek_check", to_hex(ByteView(params.check))},
              {"keys", std::move(jkeys)}};
  if (mark.seq > 0) doc["audit_mark"] = {{"seq", mark.seq}, {"mac", mark.mac}, {"size", mark.size}};
  return signed_store_text(std::move(doc), store_mac_key(kek).view());
}

std::unique_ptr<FileStoreBackend> FileStoreBackend::create(const std::string& dir) {
  if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST) {
    int err = errno;
    throw Error(Errc::Io, "cannot create store directory " + dir + ": " + errno_text(err));
  }
  check_private(dir, true);
  std::unique_ptr<FileStoreBackend> b(new FileStoreBackend(dir));
  b->lock_fd_ = open_and_lock_dir(dir);
  if (file_store_exists(dir)) {
    throw Error(Errc::AlreadyExists, "a key store already exists in " + dir);
  }
  remove_stale_temp(dir);
  return b;
}

std::unique_ptr<FileStoreBackend> FileStoreBackend::open(const std::string& dir, bool read_only) {
  std::unique_ptr<FileStoreBackend> b(new FileStoreBackend(dir));
  b->read_only_ = read_only;
  if (!read_only) {
    check_private(dir, true);
    b->lock_fd_ = open_and_lock_dir(dir);
    remove_stale_temp(dir);
    check_private(b->file_path(), false);
  }
  return b;
}

FileStoreBackend::~FileStoreBackend() {
  if (lock_fd_ >= 0) ::close(lock_fd_);
}

std::string FileStoreBackend::file_path() const { return join_path(dir_, kStoreFileName); }

KekParams FileStoreBackend::read_params() {
  const std::string path = file_path();
  const std::string raw = read_file(path);
  json doc;
  try {
    doc = json::parse(raw);
  } catch (const json::parse_error& e) {
    corrupt(path, "not valid JSON (at byte " + std::to_string(e.byte) + ")");
  } catch (const json::exception&) {
    // Not only parse_error: a number too large for a double ("8e4896") is an
    // out_of_range, which escaped and terminated keyd (found by fuzz/ store).
    corrupt(path, "not valid JSON (a number out of range)");
  }
  KekParams params;
  try {
    if (!doc.is_object() || doc.dump(2) + "\n" != raw) {
      corrupt(path, "the file was damaged or edited (it is not in the form colcrypt-keyd writes)");
    }
    json body = doc;
    std::string checksum = body.at("checksum").get<std::string>();
    body.erase("checksum");
    if (checksum != to_hex(ByteView(sha256(body.dump())))) {
      corrupt(path, "checksum mismatch (the file was damaged or edited)");
    }
    if (body.at("format").get<std::string>() != kFormatName)
      corrupt(path, "not a colcrypt key store");
    const uint32_t version =
        unsigned_field<uint32_t>(path, body.at("format_version"), "format version");
    if (version != kStoreFormatVersion) {
      corrupt(path, "unsupported format version " + std::to_string(version));
    }
    const json& kek = body.at("kek");
    std::string source = kek.at("source").get<std::string>();
    if (source == "password") {
      if (kek.at("kdf").get<std::string>() != "PBKDF2-HMAC-SHA256") corrupt(path, "unknown KDF");
      params.source = MasterSecret::Kind::Password;
      params.iterations = unsigned_field<uint32_t>(path, kek.at("iterations"), "PBKDF2 iterations");
      auto salt = from_hex(kek.at("salt").get<std::string>());
      if (!salt || salt->size() != kSaltSize || params.iterations == 0) {
        corrupt(path, "invalid PBKDF2 parameters");
      }
      params.salt = std::move(*salt);
    } else if (source == "keyfile") {
      params.source = MasterSecret::Kind::KeyFile;
    } else {
      corrupt(path, "unknown KEK source");
    }
    auto check = from_hex(body.at("kek_check").get<std::string>());
    if (!check) corrupt(path, "invalid KEK check value");
    params.check = std::move(*check);
    body_ = std::move(body);
  } catch (const json::exception&) {
    corrupt(path, "a field is missing or has the wrong type");
  }
  return params;
}

std::vector<KeyRecord> FileStoreBackend::read_keys(ByteView kek) {
  const std::string path = file_path();
  std::vector<KeyRecord> keys;
  try {
    json body = std::move(body_);
    body_ = json();
    std::string mac = body.at("mac").get<std::string>();
    body.erase("mac");
    auto expected = hmac_sha256(store_mac_key(kek).view(), ByteView::of(body.dump()));
    auto given = from_hex(mac);
    if (!given || !constant_time_equal(ByteView(*given), ByteView(expected))) {
      corrupt(path, "its MAC does not verify (the file was edited or damaged)");
    }
    for (const auto& jk : body.at("keys")) keys.push_back(parse_key(path, jk));
    if (body.contains("audit_mark")) {
      const json& mark = body.at("audit_mark");
      mark_.seq = unsigned_field<uint64_t>(path, mark.at("seq"), "audit mark");
      mark_.mac = mark.at("mac").get<std::string>();
      mark_.size = unsigned_field<uint64_t>(path, mark.at("size"), "audit mark");
      if (mark_.seq == 0) corrupt(path, "invalid audit mark");
    }
  } catch (const json::exception&) {
    corrupt(path, "a field is missing or has the wrong type");
  }
  return keys;
}

void FileStoreBackend::initialize(const KekParams& params, const std::vector<KeyRecord>& keys,
                                  ByteView kek) {
  save(params, keys, false, kek);
}

void FileStoreBackend::save(const KekParams& params, const std::vector<KeyRecord>& keys,
                            bool exact_usage, ByteView kek) {
  if (read_only_) throw Error(Errc::Internal, "a key store opened read-only was written");
  const std::string text = store_file_text(params, keys, exact_usage, kek, mark_);
  const std::string tmp = join_path(dir_, kStoreTempFileName);
  const std::string path = file_path();
  ::unlink(tmp.c_str());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) {
    int err = errno;
    throw Error(Errc::Io, "cannot write key store: cannot create " + tmp + ": " + errno_text(err));
  }
  const char* step = "write";
  try {
    if (::fchmod(fd, 0600) != 0) throw errno;
    write_all(fd, text);
    step = "fsync";
    if (::fsync(fd) != 0) throw errno;
    step = "close";
    int rc = ::close(fd);
    fd = -1;
    if (rc != 0) throw errno;
    step = "rename";
    if (::rename(tmp.c_str(), path.c_str()) != 0) throw errno;
  } catch (int err) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    throw Error(Errc::Io, std::string("cannot write key store ") + path + " (" + step +
                              "): " + errno_text(err));
  }
  // The rename is only durable once the directory entry is.
  if (::fsync(lock_fd_) != 0) {
    int err = errno;
    throw Error(Errc::Io, "cannot fsync store directory " + dir_ + ": " + errno_text(err));
  }
}

}  // namespace colcrypt::keyd
