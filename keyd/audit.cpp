#include "keyd/audit.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <ctime>
#include <fstream>
#include <optional>
#include <sstream>

#include "core/error.hpp"
#include "core/kdf.hpp"
#include "keyd/log.hpp"
#include "keyd/store.hpp"

namespace colcrypt::keyd {
namespace {

using nlohmann::json;

std::string hex(const std::array<uint8_t, 32>& bytes) {
  static const char digits[] = "0123456789abcdef";
  std::string out;
  for (uint8_t b : bytes) {
    out.push_back(digits[b >> 4]);
    out.push_back(digits[b & 0xf]);
  }
  return out;
}

std::string head_mac(HmacSha256& hmac, uint64_t seq, const std::string& mac) {
  const std::string data = "colcrypt-audit-head\n" + std::to_string(seq) + "\n" + mac;
  return hex(hmac.mac(ByteView::of(data)));
}

// An entry's MAC covers the previous entry's MAC, a newline and the entry's
// canonical text without "mac": nlohmann's compact dump (members sorted).
std::string entry_mac(HmacSha256& hmac, const std::string& previous_mac,
                      const std::string& canonical_text) {
  return hex(
      hmac.mac(ByteView::of(previous_mac), ByteView::of("\n"), ByteView::of(canonical_text)));
}

std::string errno_text(int err) { return std::strerror(err); }

bool write_all(int fd, const std::string& data) {
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

std::string read_whole(const std::string& path, bool& exists) {
  std::ifstream in(path, std::ios::binary);
  exists = static_cast<bool>(in);
  if (!exists) return {};
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// The last complete line of the file (entries are small; 64 KiB is plenty).
std::string last_line(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0 || st.st_size == 0) return {};
  const off_t chunk = std::min<off_t>(st.st_size, 65536);
  std::string buf(static_cast<size_t>(chunk), '\0');
  if (::pread(fd, buf.data(), buf.size(), st.st_size - chunk) != chunk) return {};
  while (!buf.empty() && buf.back() == '\n') buf.pop_back();
  auto nl = buf.find_last_of('\n');
  return nl == std::string::npos ? buf : buf.substr(nl + 1);
}

int64_t now_seconds() { return static_cast<int64_t>(std::time(nullptr)); }

// The last `max` bytes of the file (fewer when it is smaller).
std::string tail_text(int fd, off_t max) {
  struct stat st {};
  if (::fstat(fd, &st) != 0 || st.st_size == 0) return {};
  const off_t chunk = std::min<off_t>(st.st_size, max);
  std::string buf(static_cast<size_t>(chunk), '\0');
  if (::pread(fd, buf.data(), buf.size(), st.st_size - chunk) != chunk) return {};
  return buf;
}

// Whether the log's last entries chain on from the entry the head names:
// `tail` ends with the log's last line and holds entry `seq` (its first line
// may be cut). That is a head left behind by a crash, kill -9 or power loss
// between a batch's write and the head's update, not tampering: only a holder
// of the audit key can write entries that chain.
bool chains_on_from(HmacSha256& hmac, const std::string& tail, uint64_t seq, const std::string& mac,
                    uint64_t log_seq) {
  std::istringstream lines(tail);
  std::string previous = mac;
  uint64_t expected = seq == 0 && mac.empty() ? 1 : 0;  // 0: entry `seq` not seen yet
  for (std::string line; std::getline(lines, line);) {
    if (line.empty()) continue;
    json entry;
    try {
      entry = json::parse(line);
    } catch (const json::exception&) {
      if (expected != 0) return false;
      continue;
    }
    if (!entry.is_object() || !entry.contains("seq") || !entry["seq"].is_number_unsigned() ||
        !entry.contains("mac") || !entry["mac"].is_string()) {
      if (expected != 0) return false;
      continue;
    }
    const uint64_t entry_seq = entry["seq"].get<uint64_t>();
    const std::string entry_mac_text = entry["mac"].get<std::string>();
    if (expected == 0) {
      if (entry_seq == seq && entry_mac_text == mac) expected = seq + 1;
      continue;
    }
    entry.erase("mac");
    if (entry_seq != expected || entry_mac(hmac, previous, entry.dump()) != entry_mac_text) {
      return false;
    }
    previous = entry_mac_text;
    ++expected;
  }
  return expected != 0 && expected == log_seq + 1;
}

// An entry's field read for a report: json::value() would throw on a field
// of another type (an authenticated entry written by a keyd with other
// fields, or a verifier run on hostile input: found by the audit fuzz target).
std::string text_field(const json& entry, const char* name, const char* fallback) {
  auto it = entry.find(name);
  return it != entry.end() && it->is_string() ? it->get<std::string>() : fallback;
}

uint64_t count_field(const json& entry, const char* name) {
  auto it = entry.find(name);
  return it != entry.end() && it->is_number_unsigned() ? it->get<uint64_t>() : 0;
}

// How far back from the end of the log keyd looks for the head's entry at start.
constexpr off_t kHeadBehindWindow = off_t{4} << 20;

// Why the log and its head do not agree with the key store's mark, or empty.
// head_seq: the authentic head's entry (nullopt: no usable head).
std::string mark_problem(const std::string& path, const AuditMark& mark,
                         std::optional<uint64_t> head_seq) {
  if (mark.seq == 0) return {};
  struct Fd {
    int fd;
    ~Fd() {
      if (fd >= 0) ::close(fd);
    }
  } log{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  const int fd = log.fd;
  const std::string recorded = "entry " + std::to_string(mark.seq) + " (at byte " +
                               std::to_string(mark.size) +
                               "), which the key store recorded when keyd last synced the log";
  struct stat st {};
  if (::fstat(fd, &st) != 0 || static_cast<uint64_t>(st.st_size) < mark.size) {
    return "the log is shorter than " + recorded + " (cut back, replaced or deleted)";
  }
  const off_t end = static_cast<off_t>(mark.size);
  const off_t chunk = std::min<off_t>(end, 65536);
  std::string buf(static_cast<size_t>(chunk), '\0');
  bool same =
      chunk > 0 && ::pread(fd, buf.data(), buf.size(), end - chunk) == chunk && buf.back() == '\n';
  if (same) {
    buf.pop_back();
    const auto nl = buf.find_last_of('\n');
    try {
      const json entry = json::parse(nl == std::string::npos ? buf : buf.substr(nl + 1));
      same = entry.at("seq").get<uint64_t>() == mark.seq &&
             entry.at("mac").get<std::string>() == mark.mac;
    } catch (const json::exception&) {
      same = false;
    }
  }
  if (!same) return "the log no longer holds " + recorded + " (cut back or replaced)";
  if (head_seq && *head_seq < mark.seq) {
    return "the head names entry " + std::to_string(*head_seq) + ", before " + recorded +
           " (an old copy of the head)";
  }
  return {};
}

}  // namespace

json audit_verdict_json(const AuditVerdict& verdict, const std::string& path) {
  return {{"ok", verdict.ok},
          {"entries", verdict.entries},
          {"log", path},
          {"problem", verdict.ok ? json(nullptr) : json(verdict.problem)},
          {"gaps", verdict.gaps},
          {"lost", verdict.lost},
          {"head_behind", verdict.head_behind}};
}

AuditLog::AuditLog(std::string path, SecretBytes mac_key, AuditMark mark)
    : path_(std::move(path)), mac_(mac_key.view()) {
  fd_ = ::open(path_.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd_ < 0) {
    int err = errno;
    throw Error(Errc::Io, "cannot open audit log " + path_ + ": " + errno_text(err));
  }
  int rfd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
  std::string tail = rfd >= 0 ? last_line(rfd) : std::string();
  if (rfd >= 0) ::close(rfd);

  uint64_t log_seq = 0;
  std::string log_mac;
  std::string problem;
  uint64_t head_seq = 0;
  bool head_behind = false;
  if (!tail.empty()) {
    try {
      json last = json::parse(tail);
      log_seq = last.at("seq").get<uint64_t>();
      log_mac = last.at("mac").get<std::string>();
    } catch (const json::exception&) {
      problem = "its last line is not a complete entry";
    }
  }
  bool head_exists = false;
  const std::string head_text = read_whole(path_ + ".head", head_exists);
  if (head_exists) {
    try {
      json head = json::parse(head_text);
      const uint64_t seq = head.at("seq").get<uint64_t>();
      const std::string mac = head.at("mac").get<std::string>();
      if (head.at("head_mac").get<std::string>() != head_mac(mac_, seq, mac)) {
        problem = "its head file does not authenticate";
      } else if (problem.empty()) {
        problem = mark_problem(path_, mark, seq);
      }
      if (problem.empty() && (seq != log_seq || mac != log_mac)) {
        int tfd = seq < log_seq ? ::open(path_.c_str(), O_RDONLY | O_CLOEXEC) : -1;
        head_behind =
            tfd >= 0 && chains_on_from(mac_, tail_text(tfd, kHeadBehindWindow), seq, mac, log_seq);
        if (tfd >= 0) ::close(tfd);
        head_seq = seq;
        if (!head_behind) {
          problem = "the head names entry " + std::to_string(seq) + " but the log ends at entry " +
                    std::to_string(log_seq);
        }
      }
    } catch (const json::exception&) {
      problem = "its head file is not valid";
    }
  } else if (!tail.empty()) {
    problem = "its head file is missing";
  } else {
    problem = mark_problem(path_, mark, std::nullopt);  // log and head both gone
  }
  seq_ = committed_seq_ = log_seq;
  last_mac_ = committed_mac_ = log_mac;
  if (!problem.empty()) {
    log_error("audit log " + path_ + " is inconsistent: " + problem +
              "; recording a chain break (audit verify will fail)");
    if (!tail.empty() && !tail.empty() && tail.back() != '}') {
      // Start the next entry on a line of its own.
      write_all(fd_, "\n");
    }
    append({{"event", "audit-chain-break"}, {"problem", problem}});
  } else if (head_behind) {
    log_warning("audit log " + path_ + ": its head names entry " + std::to_string(head_seq) +
                " and entries up to " + std::to_string(log_seq) +
                " chain on from it (keyd stopped between writing entries and updating the "
                "head: a crash, kill -9 or power loss); the head is brought up to date");
    append({{"event", "audit-head-behind"}, {"head_seq", head_seq}, {"log_seq", log_seq}});
  }
  import_pending();
  sync();  // also writes the head when there was none (a new, empty log)
}

AuditLog::~AuditLog() {
  stop_sync_thread();
  if (fd_ >= 0) {
    sync();
    ::close(fd_);
  }
  if (head_fd_ >= 0) ::close(head_fd_);
}

void AuditLog::append(json event) {
  event["seq"] = seq_ + 1;
  if (!event.contains("time")) event["time"] = format_timestamp(now_seconds());
  event.erase("mac");
  // The line is the canonical text with "mac" as its last member: verify()
  // parses it, drops "mac" and gets the canonical text back.
  std::string line = event.dump(-1, ' ', false, json::error_handler_t::replace);
  const std::string mac = entry_mac(mac_, last_mac_, line);
  line.pop_back();  // the closing brace of a non-empty object
  line += ",\"mac\":\"";
  line += mac;
  line += "\"}\n";
  batch_ += line;
  ++pending_entries_;
  ++seq_;
  last_mac_ = mac;
}

bool AuditLog::write_batch() {
  if (batch_.empty()) return true;
  struct stat st {};
  const bool sized = ::fstat(fd_, &st) == 0;
  const auto started = std::chrono::steady_clock::now();
  const bool written = write_all(fd_, batch_);
  const int write_errno = errno;
  {
    std::lock_guard<std::mutex> lock(stats_mutex_);
    stats_.write_latency.observe(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
    if (!written) ++stats_.write_failures;
  }
  if (!written) {
    int err = write_errno;
    write_failures_ += pending_entries_;
    const std::string failure = errno_text(err);
    {
      std::lock_guard<std::mutex> lock(sync_mutex_);
      last_failure_ = failure;
    }
    ++loss_events_;
    // The entries of this batch are lost, but not the gap entry heading it.
    const uint64_t lost = pending_entries_ - (gap_entry_pending_ ? 1 : 0);
    if (!gap_open_) {
      gap_open_ = true;
      gap_after_seq_ = committed_seq_;
      gap_since_ = now_seconds();
      log_error("cannot append to audit log " + path_ + ": " + failure + "; entries after entry " +
                std::to_string(committed_seq_) +
                " are lost until it is writable again, and the loss will be recorded in it "
                "(an audit_gap entry)");
    } else {
      log_debug("audit log " + path_ + " still not writable: " + failure);
    }
    gap_lost_ += lost;
    // No partial line: later entries must still parse and chain.
    if (sized && ::ftruncate(fd_, st.st_size) != 0) {
      log_error("cannot cut audit log " + path_ + " back to its last whole entry");
    }
    seq_ = committed_seq_;
    last_mac_ = committed_mac_;
    batch_.clear();
    pending_entries_ = 0;
    // The next batch starts with the record of the loss (retried every commit).
    gap_entry_pending_ = false;
    append({{"event", "audit_gap"},
            {"lost", gap_lost_},
            {"after_seq", gap_after_seq_},
            {"reason", failure},
            {"since", format_timestamp(gap_since_)}});
    gap_entry_pending_ = true;
    return false;
  }
  if (gap_entry_pending_) {
    log_warning("audit log " + path_ + " is writable again; recorded the loss of " +
                std::to_string(gap_lost_) + " entries after entry " +
                std::to_string(gap_after_seq_) + " (audit_gap entry " +
                std::to_string(committed_seq_ + 1) + ")");
    gap_open_ = false;
    gap_entry_pending_ = false;
    gap_lost_ = 0;
  }
  batch_.clear();
  pending_entries_ = 0;
  committed_seq_ = seq_;
  committed_mac_ = last_mac_;
  return true;
}

int AuditLog::timed_fdatasync() {
  const auto started = std::chrono::steady_clock::now();
  const int rc = fdatasync_(fd_);
  const int err = errno;
  {
    std::lock_guard<std::mutex> lock(stats_mutex_);
    stats_.sync_latency.observe(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
    if (rc != 0) ++stats_.sync_failures;
  }
  errno = err;
  return rc;
}

bool AuditLog::sync_inline() {
  const uint64_t target = committed_seq_;
  if (timed_fdatasync() != 0) {
    int err = errno;
    ++write_failures_;
    {
      std::lock_guard<std::mutex> lock(sync_mutex_);
      last_failure_ = "fdatasync: " + errno_text(err);
    }
    ++loss_events_;
    log_error("cannot fdatasync audit log " + path_ + ": " + errno_text(err));
    return false;
  }
  uint64_t synced = synced_seq_.load();
  while (synced < target && !synced_seq_.compare_exchange_weak(synced, target)) {
  }
  return true;
}

bool AuditLog::commit() {
  if (batch_.empty()) return true;
  bool written = write_batch();
  // The head names the last entry that is in the file.
  write_head(false);
  if (!written) return false;
  if (!sync_thread_.joinable()) return sync_inline();
  {
    std::lock_guard<std::mutex> lock(sync_mutex_);
    written_for_sync_ = committed_seq_;
  }
  sync_wake_.notify_one();
  return true;
}

void AuditLog::sync() {
  if (fd_ < 0) return;
  const bool synced = write_batch() && sync_inline();
  const bool head_synced = write_head(true);
  struct stat st {};
  // Nothing pending after a successful write_batch: the file ends with the
  // last committed entry.
  if (synced && head_synced && committed_seq_ > 0 && ::fstat(fd_, &st) == 0) {
    durable_mark_ = {committed_seq_, committed_mac_, static_cast<uint64_t>(st.st_size)};
  }
}

void AuditLog::start_sync_thread(std::function<void()> on_synced) {
  if (sync_thread_.joinable()) return;
  sync_thread_ = std::thread([this, on_synced = std::move(on_synced)] { sync_loop(on_synced); });
}

void AuditLog::stop_sync_thread() {
  if (!sync_thread_.joinable()) return;
  {
    std::lock_guard<std::mutex> lock(sync_mutex_);
    sync_stop_ = true;
  }
  sync_wake_.notify_all();
  sync_thread_.join();
}

bool AuditLog::sync_stalled() const {
  const int64_t started = sync_started_ns_.load(std::memory_order_acquire);
  if (started == 0) return false;
  const int64_t now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                          std::chrono::steady_clock::now().time_since_epoch())
                          .count();
  return now - started >= int64_t{kAuditSyncStallMs} * 1000000;
}

void AuditLog::sync_loop(std::function<void()> on_synced) {
  std::unique_lock<std::mutex> lock(sync_mutex_);
  for (;;) {
    sync_wake_.wait(lock, [this] { return sync_stop_ || written_for_sync_ > synced_seq_.load(); });
    if (sync_stop_) return;
    // Everything written so far, including what was written while the
    // previous fdatasync ran: one fdatasync for all of it.
    const uint64_t target = written_for_sync_;
    lock.unlock();
    sync_started_ns_.store(std::chrono::duration_cast<std::chrono::nanoseconds>(
                               std::chrono::steady_clock::now().time_since_epoch())
                               .count(),
                           std::memory_order_release);
    const int rc = timed_fdatasync();
    const int err = errno;
    sync_started_ns_.store(0, std::memory_order_release);
    lock.lock();
    if (rc == 0) {
      uint64_t synced = synced_seq_.load();
      while (synced < target && !synced_seq_.compare_exchange_weak(synced, target)) {
      }
      sync_failing_.store(false, std::memory_order_release);
    } else {
      ++write_failures_;
      last_failure_ = "fdatasync: " + errno_text(err);
      // Counted before the loop can see anything else move (loss_events()).
      loss_events_.fetch_add(1, std::memory_order_release);
      sync_failing_.store(true, std::memory_order_release);
    }
    lock.unlock();
    if (rc != 0) log_error("cannot fdatasync audit log " + path_ + ": " + errno_text(err));
    on_synced();
    lock.lock();
    if (rc != 0) {
      sync_wake_.wait_for(lock, std::chrono::milliseconds(kAuditSyncRetryMs),
                          [this] { return sync_stop_; });
    }
  }
}

bool AuditLog::write_head(bool durable) {
  // Committed entries only: after a failed write, batch_ holds an unwritten
  // audit_gap entry that seq_ already counts.
  json head = {{"seq", committed_seq_},
               {"mac", committed_mac_},
               {"head_mac", head_mac(mac_, committed_seq_, committed_mac_)}};
  const std::string dst = path_ + ".head";
  // One fixed-size record rewritten in place with one pwrite() (the padding
  // is JSON whitespace): a crash of keyd leaves the old or the new record,
  // never a mix, and a commit costs no open, close or rename.
  std::string record = head.dump();
  if (record.size() >= kHeadRecordSize) {
    ++write_failures_;
    log_error("audit head record for " + dst + " is too long");
    return false;
  }
  record.resize(kHeadRecordSize - 1, ' ');
  record += '\n';
  if (head_fd_ < 0) {
    head_fd_ = ::open(dst.c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    head_dir_synced_ = false;
    if (head_fd_ >= 0) {
      // A head written by an older keyd (rename, shorter) or its temp file.
      struct stat st {};
      if (::fstat(head_fd_, &st) == 0 && st.st_size > static_cast<off_t>(kHeadRecordSize)) {
        if (::ftruncate(head_fd_, kHeadRecordSize) != 0) {
          log_warning("cannot cut audit head " + dst + " to its record size");
        }
      }
      ::unlink((dst + ".tmp").c_str());
    }
  }
  bool ok = head_fd_ >= 0 && ::pwrite(head_fd_, record.data(), record.size(), 0) ==
                                 static_cast<ssize_t>(record.size());
  int err = errno;
  if (ok && durable && ::fdatasync(head_fd_) != 0) {
    ok = false;
    err = errno;
  }
  if (!ok) {
    ++write_failures_;
    log_error("cannot write audit head " + dst + ": " + errno_text(err));
    return false;
  }
  if (durable && !head_dir_synced_) {
    // The head file's directory entry is durable once the directory is.
    const auto slash = dst.find_last_of('/');
    const std::string dir =
        slash == std::string::npos ? "." : (slash == 0 ? "/" : dst.substr(0, slash));
    int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0 || ::fsync(dfd) != 0) {
      err = errno;
      ++write_failures_;
      log_error("cannot fsync directory " + dir + " of audit head: " + errno_text(err));
      if (dfd >= 0) ::close(dfd);
      return false;
    }
    ::close(dfd);
    head_dir_synced_ = true;
  }
  return true;
}

void AuditLog::import_pending() {
  const std::string pending = path_ + ".pending";
  bool exists = false;
  const std::string text = read_whole(pending, exists);
  if (!exists) return;
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.empty()) continue;
    json event;
    try {
      event = json::parse(line);
      if (!event.is_object()) throw std::runtime_error("not an object");
    } catch (const std::exception&) {
      event = {{"event", "pending-unreadable"}};
    }
    event["recorded_unauthenticated"] = true;
    if (event.contains("time")) event["original_time"] = event["time"];
    event.erase("time");
    event.erase("seq");
    append(std::move(event));
  }
  sync();  // chained and on disk before the unauthenticated copy goes
  ::unlink(pending.c_str());
}

void AuditLog::record_pending(const std::string& path, json event) {
  event["time"] = format_timestamp(now_seconds());
  const std::string pending = path + ".pending";
  int fd = ::open(pending.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) return;  // best effort: keyd is exiting with its own error anyway
  write_all(fd, event.dump(-1, ' ', false, json::error_handler_t::replace) + "\n");
  ::fdatasync(fd);
  ::close(fd);
}

AuditVerdict AuditLog::verify(const std::string& path, ByteView mac_key, const AuditMark& mark) {
  AuditVerdict verdict;
  bool exists = false;
  const std::string text = read_whole(path, exists);
  if (!exists) {
    verdict.problem = "audit log " + path + " does not exist";
    return verdict;
  }
  HmacSha256 hmac(mac_key);
  // The head is read first: the walk remembers the mac of the entry it names.
  bool head_exists = false;
  const std::string head_text = read_whole(path + ".head", head_exists);
  uint64_t head_seq = 0;
  std::optional<std::string> mac_at_head;
  try {
    if (head_exists) head_seq = json::parse(head_text).at("seq").get<uint64_t>();
  } catch (const json::exception&) {
  }
  if (head_seq == 0) mac_at_head = "";
  std::string previous;
  uint64_t expected = 1;
  size_t pos = 0;
  std::string break_problem;
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) {
      verdict.problem = "entry " + std::to_string(expected) + " is incomplete (no newline)";
      return verdict;
    }
    const std::string line = text.substr(pos, nl - pos);
    pos = nl + 1;
    if (line.empty()) continue;
    json entry;
    try {
      entry = json::parse(line);
    } catch (const json::exception&) {
      verdict.problem = "entry " + std::to_string(expected) + " is not valid JSON";
      return verdict;
    }
    if (!entry.is_object() || !entry.contains("mac") || !entry["mac"].is_string() ||
        !entry.contains("seq") || !entry["seq"].is_number_unsigned()) {
      verdict.problem = "entry " + std::to_string(expected) + " has no seq or mac";
      return verdict;
    }
    const uint64_t seq = entry["seq"].get<uint64_t>();
    const std::string mac = entry["mac"].get<std::string>();
    entry.erase("mac");
    if (seq != expected) {
      verdict.problem = "expected entry " + std::to_string(expected) + " but found entry " +
                        std::to_string(seq) + " (entries removed or reordered)";
      return verdict;
    }
    if (entry_mac(hmac, previous, entry.dump()) != mac) {
      verdict.problem = "entry " + std::to_string(seq) +
                        " does not authenticate (modified, or an entry before it was removed)";
      return verdict;
    }
    if (seq == mark.seq && (mac != mark.mac || pos != mark.size)) {
      verdict.problem = "entry " + std::to_string(seq) +
                        " is not the one the key store recorded when keyd last synced the log "
                        "(the log was replaced)";
      return verdict;
    }
    const std::string event = text_field(entry, "event", "");
    if (event == "audit_gap") {
      const uint64_t lost = count_field(entry, "lost");
      verdict.lost += lost;
      verdict.gaps.push_back(
          "entry " + std::to_string(seq) + ": " + std::to_string(lost) + " entries after entry " +
          std::to_string(count_field(entry, "after_seq")) + " were never written (" +
          text_field(entry, "reason", "?") + ", since " + text_field(entry, "since", "?") + ")");
    }
    if (event == "audit-chain-break" && break_problem.empty()) {
      break_problem = "entry " + std::to_string(seq) +
                      " records that keyd found the log inconsistent at start: " +
                      text_field(entry, "problem", "");
    }
    previous = mac;
    verdict.entries = seq;
    if (seq == head_seq) mac_at_head = mac;
    ++expected;
  }
  if (mark.seq > verdict.entries) {
    verdict.problem = "the log ends at entry " + std::to_string(verdict.entries) +
                      ", before entry " + std::to_string(mark.seq) +
                      ", which the key store recorded when keyd last synced the log "
                      "(entries removed from its end)";
    return verdict;
  }
  if (!head_exists) {
    verdict.problem = "head file " + path + ".head is missing";
    return verdict;
  }
  try {
    json head = json::parse(head_text);
    const uint64_t seq = head.at("seq").get<uint64_t>();
    const std::string mac = head.at("mac").get<std::string>();
    if (head.at("head_mac").get<std::string>() != head_mac(hmac, seq, mac)) {
      verdict.problem = "head file does not authenticate";
      return verdict;
    }
    if (seq < mark.seq) {
      verdict.problem = "the head names entry " + std::to_string(seq) + ", before entry " +
                        std::to_string(mark.seq) +
                        ", which the key store recorded when keyd last synced the log (an old "
                        "copy of the head)";
      return verdict;
    }
    if (seq < verdict.entries && mac_at_head == mac) {
      // Entries chain on past the head: keyd stopped between their write and
      // the head's update; its next start records it and updates the head.
      verdict.head_behind = verdict.entries - seq;
    } else if (seq != verdict.entries || mac != previous) {
      verdict.problem = "the head names entry " + std::to_string(seq) +
                        " but the log ends at entry " + std::to_string(verdict.entries) +
                        " (truncated or extended tail)";
      return verdict;
    }
  } catch (const json::exception&) {
    verdict.problem = "head file is not valid";
    return verdict;
  }
  if (!break_problem.empty()) {
    verdict.problem = break_problem;
    return verdict;
  }
  verdict.ok = true;
  return verdict;
}

}  // namespace colcrypt::keyd
