#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "checks.hpp"
#include "core/error.hpp"
#include "fixtures.hpp"
#include "keyd/audit.hpp"
#include "keyd/store.hpp"
#include "scratch_dir.hpp"

namespace colcrypt::fuzz {

namespace {

using nlohmann::json;

const std::string kLog = keyd::kAuditFileName;

void clear_files() {
  for (const char* suffix : {"", ".head", ".pending", ".head.tmp"})
    remove_scratch_file(kLog + suffix);
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> lines;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    if (nl == std::string::npos) nl = text.size();
    if (nl > pos) lines.push_back(text.substr(pos, nl - pos));
    pos = nl + 1;
  }
  return lines;
}

// Hostile files: keyd opens them (reading the tail and the head), then the
// verifier reads them. Neither may crash; the verdict is consistent.
// data[0..1]: the head's length (big-endian); then the head, then the log.
bool check_hostile(const uint8_t* data, size_t size) {
  if (size < 2) return true;
  const std::string rest(reinterpret_cast<const char*>(data + 2), size - 2);
  const size_t split = (size_t{data[0]} << 8 | data[1]) % (rest.size() + 1);
  clear_files();
  write_scratch_file(kLog, rest.substr(split));
  write_scratch_file(kLog + ".head", rest.substr(0, split));
  const SecretBytes key = keyd::audit_mac_key(test_kek());
  const std::string path = scratch_dir() + "/" + kLog;
  keyd::AuditVerdict before = keyd::AuditLog::verify(path, key.view());
  if (before.ok != before.problem.empty()) return false;
  try {
    keyd::AuditLog log(path, SecretBytes(key.view()));
    log.append(json{{"event", "fuzz"}});
    log.sync();
  } catch (const Error& e) {
    if (e.code() != Errc::Io) return false;
  }
  const keyd::AuditVerdict after = keyd::AuditLog::verify(path, key.view());
  // keyd's start never makes a broken log verify (it records the break).
  if (after.ok != after.problem.empty()) return false;
  return !after.ok || before.ok || before.problem.find("head") != std::string::npos ||
         before.entries == 0;
}

// A chain keyd writes from the input's events verifies; one byte flipped
// (data[0..2]: where and how) verifies only if the events read the same.
bool check_chain(const uint8_t* data, size_t size) {
  if (size < 3) return true;
  const size_t where = size_t{data[0]} << 8 | data[1];
  const uint8_t flip = data[2];
  clear_files();
  const SecretBytes key = keyd::audit_mac_key(test_kek());
  const std::string path = scratch_dir() + "/" + kLog;
  size_t appended = 0;
  {
    keyd::AuditLog log(path, SecretBytes(key.view()));
    for (const std::string& line :
         lines_of(std::string(reinterpret_cast<const char*>(data + 3), size - 3))) {
      json event = json::parse(line, nullptr, false);
      if (event.is_discarded() || !event.is_object()) continue;
      log.append(std::move(event));
      ++appended;
    }
    log.sync();
  }
  const keyd::AuditVerdict verdict = keyd::AuditLog::verify(path, key.view());
  if (!verdict.ok || verdict.entries != appended) return false;

  std::string text = read_scratch_file(kLog);
  if (flip == 0 || text.empty()) return true;
  const std::string original = text;
  text[where % text.size()] ^= static_cast<char>(flip);
  write_scratch_file(kLog, text);
  const keyd::AuditVerdict tampered = keyd::AuditLog::verify(path, key.view());
  if (!tampered.ok) return true;
  const std::vector<std::string> a = lines_of(original), b = lines_of(text);
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    const json ja = json::parse(a[i], nullptr, false), jb = json::parse(b[i], nullptr, false);
    if (ja.is_discarded() || jb.is_discarded() || ja != jb) return false;
  }
  return true;
}

}  // namespace

// data[0] even: hostile log and head files; odd: a chain from JSON events.
bool check_audit(const uint8_t* data, size_t size) {
  if (size == 0) return true;
  return data[0] & 1 ? check_chain(data + 1, size - 1) : check_hostile(data + 1, size - 1);
}

}  // namespace colcrypt::fuzz
