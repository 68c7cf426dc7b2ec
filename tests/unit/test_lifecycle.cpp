// Key lifecycle (issue 3): the version state machine, usage caps with block
// grants, rotation due dates, and the audit log's MAC chain.
#include <signal.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "core/error.hpp"
#include "keyd/audit.hpp"
#include "keyd/log.hpp"
#include "keyd/server.hpp"
#include "keyd/store.hpp"

using namespace colcrypt;
using namespace colcrypt::keyd;
using nlohmann::json;

namespace {

class LifecycleDir {
 public:
  LifecycleDir() {
    char pattern[] = "/tmp/colcrypt-lifecycle-test-XXXXXX";
    if (!::mkdtemp(pattern)) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
    set_log_level(LogLevel::Error);
  }
  ~LifecycleDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::string store() const { return path_ + "/store"; }
  std::string audit() const { return path_ + "/audit.log"; }

 private:
  std::string path_;
};

MasterSecret pw(const std::string& text) {
  MasterSecret s;
  s.bytes = SecretBytes(ByteView::of(text));
  return s;
}

Errc code_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.code();
  }
  return Errc::Internal;
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void spit(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << data;
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> lines;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t nl = text.find('\n', pos);
    lines.push_back(text.substr(pos, nl - pos));
    pos = nl + 1;
  }
  return lines;
}

// seq 1, 2, 3, ... in file order.
bool log_is_chained_in_order(const std::vector<std::string>& lines) {
  uint64_t expected = 1;
  for (const auto& line : lines) {
    if (json::parse(line)["seq"].get<uint64_t>() != expected++) return false;
  }
  return true;
}

std::string join(const std::vector<std::string>& lines) {
  std::string out;
  for (const auto& l : lines) out += l + "\n";
  return out;
}

}  // namespace

TEST_CASE("lifecycle: version state machine", "[keystore][lifecycle]") {
  LifecycleDir dir;
  {
    KeyStore store = KeyStore::create(dir.store(), pw("pw"), 1000);
    store.create_key("k", {});
    store.rotate_key("k");
    store.rotate_key("k");  // versions 1, 2 decrypt-only; 3 primary
    // Past every retirement (grace tested on its own below).
    const RetireGrace no_grace{static_cast<int64_t>(std::time(nullptr)), 0, false};
    // The primary can be neither disabled nor destroyed.
    CHECK(code_of([&] { store.disable_version("k", 3, no_grace); }) == Errc::InvalidArgument);
    CHECK(code_of([&] { store.destroy_version("k", 3, no_grace); }) == Errc::InvalidArgument);
    CHECK(code_of([&] { store.disable_version("k", 9, no_grace); }) == Errc::KeyNotFound);
    CHECK(code_of([&] { store.disable_version("nope", 1, no_grace); }) == Errc::KeyNotFound);

    const KeyRecord& d = store.disable_version("k", 1, no_grace);
    CHECK(d.versions[0].state == wire::KeyState::Disabled);
    const KeyRecord& e = store.enable_version("k", 1);
    CHECK(e.versions[0].state == wire::KeyState::DecryptOnly);
    store.disable_version("k", 1, no_grace);
    const KeyRecord& x = store.destroy_version("k", 1, no_grace);  // disabled -> destroyed
    CHECK(x.versions[0].state == wire::KeyState::Destroyed);
    CHECK(x.versions[0].wrapped.empty());
    CHECK(x.versions[0].destroyed_at);
    store.destroy_version("k", 2, no_grace);  // decrypt-only -> destroyed
    // Irreversible.
    CHECK(code_of([&] { store.enable_version("k", 1); }) == Errc::InvalidArgument);
    CHECK(code_of([&] { store.disable_version("k", 1, no_grace); }) == Errc::InvalidArgument);
    CHECK(code_of([&] { store.destroy_version("k", 1, no_grace); }) == Errc::InvalidArgument);
    CHECK(code_of([&] { store.unwrap(*store.find("k"), 1); }) == Errc::KeyUnavailable);
    CHECK(store.unwrap(*store.find("k"), 3).size() == 32);
  }
  // The key bytes are gone from the file, and the store still opens.
  const std::string file = slurp(dir.store() + "/keystore.json");
  json doc = json::parse(file);
  CHECK(doc["keys"][0]["versions"][0]["wrapped"].is_null());
  CHECK(doc["keys"][0]["versions"][1]["wrapped"].is_null());
  CHECK(doc["keys"][0]["versions"][2]["wrapped"].is_string());
  KeyStore store = KeyStore::open(dir.store(), pw("pw"));
  const KeyRecord* k = store.find("k");
  REQUIRE(k);
  CHECK(k->versions[0].state == wire::KeyState::Destroyed);
  CHECK(k->versions[1].state == wire::KeyState::Destroyed);
  CHECK(k->primary_version == 3);
  CHECK(code_of([&] { store.unwrap(*k, 2); }) == Errc::KeyUnavailable);
}

TEST_CASE("lifecycle: a retired version outlives the retirement grace", "[keystore][lifecycle]") {
  LifecycleDir dir;
  KeyStore store = KeyStore::create(dir.store(), pw("pw"), 1000);
  store.create_key("k", {});
  const auto before = static_cast<int64_t>(std::time(nullptr));
  store.rotate_key("k");
  const auto after = static_cast<int64_t>(std::time(nullptr));
  const KeyRecord* k = store.find("k");
  REQUIRE(k->versions[0].retired_at);
  const int64_t retired = *k->versions[0].retired_at;
  CHECK(retired >= before);
  CHECK(retired <= after);
  CHECK_FALSE(k->versions[1].retired_at);  // the primary is not retired

  // Inside the grace (injected clock): refused even though no row uses it,
  // with how long to wait and why.
  const RetireGrace inside{retired + 99, 100, false};
  std::string message;
  try {
    store.destroy_version("k", 1, inside);
  } catch (const Error& e) {
    CHECK(e.code() == Errc::InvalidArgument);
    message = e.what();
  }
  CHECK(message.find("retired at " + format_timestamp(retired)) != std::string::npos);
  CHECK(message.find("(in 1 s)") != std::string::npos);
  CHECK(message.find("colcrypt.key_cache_ttl") != std::string::npos);
  CHECK(message.find("--force") != std::string::npos);
  CHECK(code_of([&] { store.disable_version("k", 1, inside); }) == Errc::InvalidArgument);
  CHECK(store.find("k")->versions[0].state == wire::KeyState::DecryptOnly);
  CHECK_FALSE(store.find("k")->versions[0].wrapped.empty());

  // Once the grace has passed: allowed.
  CHECK(store.disable_version("k", 1, {retired + 100, 100, false}).versions[0].state ==
        wire::KeyState::Disabled);
  store.enable_version("k", 1);
  // A grace of 0: allowed at once.
  CHECK(store.disable_version("k", 1, {retired, 0, false}).versions[0].state ==
        wire::KeyState::Disabled);
  store.enable_version("k", 1);

  // --force: allowed inside the grace.
  store.rotate_key("k");
  const int64_t retired2 = *store.find("k")->versions[1].retired_at;
  CHECK(code_of([&] {
          store.destroy_version("k", 2, {retired2, 86400, false});
        }) == Errc::InvalidArgument);
  CHECK(store.destroy_version("k", 2, {retired2, 86400, true}).versions[1].state ==
        wire::KeyState::Destroyed);

  // retired_at is on disk and survives a restart.
  const json doc = json::parse(slurp(dir.store() + "/keystore.json"));
  CHECK(doc["keys"][0]["versions"][0]["retired_at"] == format_timestamp(retired));
  CHECK_FALSE(doc["keys"][0]["versions"][2].contains("retired_at"));
  { KeyStore closing = std::move(store); }
  KeyStore reopened = KeyStore::open(dir.store(), pw("pw"));
  CHECK(reopened.find("k")->versions[0].retired_at == retired);
  CHECK_FALSE(reopened.find("k")->versions[2].retired_at);
}

TEST_CASE("lifecycle: rotation publishes the new version before making it primary",
          "[keystore][lifecycle]") {
  LifecycleDir dir;
  KeyStore store = KeyStore::create(dir.store(), pw("pw"), 1000);
  store.create_key("k", {});
  const KeyRecord& r = store.rotate_key("k");
  CHECK(r.primary_version == 2);
  CHECK(r.versions[0].state == wire::KeyState::DecryptOnly);
  CHECK(r.versions[1].state == wire::KeyState::Active);
}

TEST_CASE("lifecycle: usage grants never exceed the cap", "[keystore][lifecycle]") {
  LifecycleDir dir;
  {
    KeyStore store = KeyStore::create(dir.store(), pw("pw"), 1000);
    NewKeyOptions o;
    o.max_uses_per_version = 100;
    store.create_key("k", o);
    uint64_t total = 0;
    UseGrant g = store.charge_uses("k", 30, 1000);
    CHECK(g.version == 1);
    CHECK(g.granted == 30);
    CHECK_FALSE(g.rotated);
    total += g.granted;
    g = store.charge_uses("k", 30, 1001);
    total += g.granted;
    g = store.charge_uses("k", 30, 1002);
    total += g.granted;
    CHECK(total == 90);
    // Only 10 are left: the grant is cut to them, and the key rotates after it.
    g = store.charge_uses("k", 30, 1003);
    CHECK(g.version == 1);
    CHECK(g.granted == 10);
    CHECK(g.rotated);
    const KeyRecord* k = store.find("k");
    CHECK(k->primary_version == 2);
    CHECK(k->versions[0].usage_count == 100);
    g = store.charge_uses("k", 1000, 1004);
    CHECK(g.version == 2);
    CHECK(g.granted == 100);  // min(wanted, cap)
    CHECK(g.rotated);
    k = store.find("k");
    CHECK(k->primary_version == 3);
    CHECK(k->usage_count == 200);
    CHECK(k->last_used == 1004);
    for (const auto& v : k->versions) CHECK(v.usage_count <= 100);
    store.charge_uses("k", 5, 1005);
    store.flush(true);  // a clean stop writes exact counts
  }
  KeyStore store = KeyStore::open(dir.store(), pw("pw"));
  const KeyRecord* k = store.find("k");
  CHECK(k->usage_count == 205);
  CHECK(k->versions[2].usage_count == 5);
  CHECK(code_of([&] { store.charge_uses("nope", 1, 1); }) == Errc::KeyNotFound);
}

TEST_CASE("lifecycle: a crash never under-counts usage", "[keystore][lifecycle]") {
  LifecycleDir dir;
  {
    KeyStore store = KeyStore::create(dir.store(), pw("pw"), 1000);
    NewKeyOptions o;
    o.max_uses_per_version = 1600;
    store.create_key("k", o);
    store.charge_uses("k", 7, 1000);
    store.charge_uses("k", 5, 1000);
    // No flush: the process "dies" here. The file already charges a reservation.
  }
  KeyStore store = KeyStore::open(dir.store(), pw("pw"));
  const KeyRecord* k = store.find("k");
  CHECK(k->versions[0].usage_count >= 12);
  CHECK(k->usage_count >= 12);
  CHECK(k->versions[0].usage_count <= 12 + 1600 / 16 + 7);
}

TEST_CASE("lifecycle: expired keys grant nothing", "[keystore][lifecycle]") {
  LifecycleDir dir;
  KeyStore store = KeyStore::create(dir.store(), pw("pw"), 1000);
  NewKeyOptions o;
  o.expires_at = ::time(nullptr) + 100;
  store.create_key("k", o);
  CHECK(store.charge_uses("k", 1, ::time(nullptr)).granted == 1);
  CHECK(code_of([&] { store.charge_uses("k", 1, ::time(nullptr) + 200); }) == Errc::KeyUnavailable);
  // lookups that never encrypt (blind index searches) still work after expiry
  const UseGrant lookup = store.charge_uses("k", 0, ::time(nullptr) + 200);
  CHECK(lookup.granted == 0);
  CHECK(lookup.version == 1);
}

TEST_CASE("lifecycle: rotation due by interval and by usage", "[keystore][lifecycle]") {
  LifecycleDir dir;
  KeyStore store = KeyStore::create(dir.store(), pw("pw"), 1000);
  NewKeyOptions o;
  o.rotation_interval_days = 2;
  o.max_uses_per_version = 10;
  const int64_t created = store.create_key("k", o).created_at;
  const KeyRecord* k = store.find("k");
  CHECK(store.rotation_due(*k, created + 1, 86400) == RotationReason::None);
  CHECK(store.rotation_due(*k, created + 2 * 86400, 86400) == RotationReason::Interval);
  CHECK(store.rotation_due(*k, created + 2, 1) == RotationReason::Interval);  // 1 s "days"
  store.charge_uses("k", 9, created);
  k = store.find("k");
  CHECK(store.rotation_due(*k, created, 86400) == RotationReason::None);
}

TEST_CASE("lifecycle: stores without the new fields still open", "[keystore][lifecycle]") {
  LifecycleDir dir;
  { KeyStore::create(dir.store(), pw("pw"), 1000).create_key("k", {}); }
  KeyStore store = KeyStore::open(dir.store(), pw("pw"));
  CHECK(store.find("k")->max_uses_per_version == kDefaultMaxUsesPerVersion);
}

TEST_CASE("audit log: a real chain verifies", "[lifecycle][audit]") {
  LifecycleDir dir;
  SecretBytes key = SecretBytes::random(32);
  {
    AuditLog log(dir.audit(), SecretBytes(key.view()));
    for (int i = 0; i < 5; ++i) log.append({{"event", "fetch"}, {"uid", 26}, {"pid", 100 + i}});
    CHECK(log.last_seq() == 5);
  }
  {
    // Reopening continues the chain.
    AuditLog log(dir.audit(), SecretBytes(key.view()));
    log.append({{"event", "admin"}, {"op", "rotate"}});
    CHECK(log.last_seq() == 6);
  }
  AuditVerdict v = AuditLog::verify(dir.audit(), key.view());
  CHECK(v.ok);
  CHECK(v.entries == 6);
  // No key bytes: the entries carry what they were given plus seq, time and mac.
  for (const auto& line : lines_of(slurp(dir.audit()))) {
    json e = json::parse(line);
    CHECK(e.contains("seq"));
    CHECK(e.contains("mac"));
    CHECK(e.contains("time"));
  }
  // Another key does not verify it.
  SecretBytes other = SecretBytes::random(32);
  CHECK_FALSE(AuditLog::verify(dir.audit(), other.view()).ok);
}

TEST_CASE("audit log: every kind of tampering is detected", "[lifecycle][audit]") {
  LifecycleDir dir;
  SecretBytes key = SecretBytes::random(32);
  {
    AuditLog log(dir.audit(), SecretBytes(key.view()));
    for (int i = 0; i < 6; ++i) log.append({{"event", "fetch"}, {"uid", 26}, {"pid", 100 + i}});
  }
  const std::string good = slurp(dir.audit());
  const std::string good_head = slurp(dir.audit() + ".head");
  REQUIRE(AuditLog::verify(dir.audit(), key.view()).ok);
  auto lines = lines_of(good);
  REQUIRE(lines.size() == 6);
  auto verdict_after = [&](const std::string& log_text) {
    spit(dir.audit(), log_text);
    AuditVerdict v = AuditLog::verify(dir.audit(), key.view());
    spit(dir.audit(), good);
    spit(dir.audit() + ".head", good_head);
    return v;
  };

  SECTION("modified entry") {
    auto l = lines;
    json e = json::parse(l[2]);
    e["uid"] = 0;
    l[2] = e.dump();
    AuditVerdict v = verdict_after(join(l));
    CHECK_FALSE(v.ok);
    CHECK(v.problem.find("entry 3") != std::string::npos);
  }
  SECTION("removed entry") {
    auto l = lines;
    l.erase(l.begin() + 3);
    CHECK_FALSE(verdict_after(join(l)).ok);
  }
  SECTION("removed first entry") {
    auto l = lines;
    l.erase(l.begin());
    CHECK_FALSE(verdict_after(join(l)).ok);
  }
  SECTION("reordered entries") {
    auto l = lines;
    std::swap(l[1], l[2]);
    CHECK_FALSE(verdict_after(join(l)).ok);
  }
  SECTION("truncated tail") {
    auto l = lines;
    l.pop_back();
    AuditVerdict v = verdict_after(join(l));
    CHECK_FALSE(v.ok);
    CHECK(v.problem.find("truncated") != std::string::npos);
  }
  SECTION("truncated tail with the head rewritten from the log") {
    auto l = lines;
    l.pop_back();
    json last = json::parse(l.back());
    json head = json::parse(good_head);
    head["seq"] = last["seq"];
    head["mac"] = last["mac"];
    spit(dir.audit() + ".head", head.dump() + "\n");
    CHECK_FALSE(verdict_after(join(l)).ok);
  }
  SECTION("partial last line") { CHECK_FALSE(verdict_after(good.substr(0, good.size() - 10)).ok); }
  SECTION("seq renumbered") {
    auto l = lines;
    json e = json::parse(l[5]);
    e["seq"] = 9;
    l[5] = e.dump();
    CHECK_FALSE(verdict_after(join(l)).ok);
  }
  SECTION("missing head") {
    ::unlink((dir.audit() + ".head").c_str());
    CHECK_FALSE(AuditLog::verify(dir.audit(), key.view()).ok);
  }
}

TEST_CASE("audit log: keyd records a break it finds at start", "[lifecycle][audit]") {
  LifecycleDir dir;
  SecretBytes key = SecretBytes::random(32);
  {
    AuditLog log(dir.audit(), SecretBytes(key.view()));
    for (int i = 0; i < 3; ++i) log.append({{"event", "fetch"}});
  }
  auto lines = lines_of(slurp(dir.audit()));
  lines.pop_back();
  spit(dir.audit(), join(lines));
  {
    AuditLog log(dir.audit(), SecretBytes(key.view()));  // chains on, recording the break
    log.append({{"event", "fetch"}});
  }
  AuditVerdict v = AuditLog::verify(dir.audit(), key.view());
  CHECK_FALSE(v.ok);
  CHECK(v.problem.find("inconsistent") != std::string::npos);
}

TEST_CASE("audit log: a head left behind by a crash between the two writes is no break",
          "[lifecycle][audit]") {
  // keyd writes a batch, then updates the head: a kill -9 (or a power loss)
  // between the two leaves entries that chain on past the entry the head names.
  LifecycleDir dir;
  SecretBytes key = SecretBytes::random(32);
  {
    AuditLog log(dir.audit(), SecretBytes(key.view()));
    for (int i = 0; i < 3; ++i) log.append({{"event", "fetch"}, {"pid", i}});
  }
  const std::string old_head = slurp(dir.audit() + ".head");
  {
    AuditLog log(dir.audit(), SecretBytes(key.view()));
    for (int i = 3; i < 5; ++i) log.append({{"event", "fetch"}, {"pid", i}});
  }
  const std::string whole_log = slurp(dir.audit());
  spit(dir.audit() + ".head", old_head);  // the head as the crash left it
  AuditVerdict behind = AuditLog::verify(dir.audit(), key.view());
  INFO(behind.problem);
  CHECK(behind.ok);
  CHECK(behind.head_behind == behind.entries - 3);

  SECTION("the next start records it, brings the head up to date, and the chain verifies") {
    { AuditLog log(dir.audit(), SecretBytes(key.view())); }
    const std::string log_text = slurp(dir.audit());
    CHECK(log_text.find("\"event\":\"audit-head-behind\"") != std::string::npos);
    CHECK(log_text.find("audit-chain-break") == std::string::npos);
    AuditVerdict v = AuditLog::verify(dir.audit(), key.view());
    INFO(v.problem);
    CHECK(v.ok);
    CHECK(v.head_behind == 0);
  }
  SECTION("entries past the head that do not chain on are still a break") {
    auto lines = lines_of(whole_log);
    json e = json::parse(lines.back());
    e["pid"] = 99;
    lines.back() = e.dump();
    spit(dir.audit(), join(lines));
    CHECK_FALSE(AuditLog::verify(dir.audit(), key.view()).ok);
    { AuditLog log(dir.audit(), SecretBytes(key.view())); }
    AuditVerdict v = AuditLog::verify(dir.audit(), key.view());
    CHECK_FALSE(v.ok);
  }
}

TEST_CASE("audit log: a log cut back to an old copy of its head fails against the store's mark",
          "[lifecycle][audit][audit-mark]") {
  // Someone who kept a copy of audit.head cuts the log back to (or just
  // past) the entry it names and restores it: the chain and the head agree,
  // so only the mark the key store keeps can tell.
  LifecycleDir dir;
  SecretBytes key = SecretBytes::random(32);
  {
    AuditLog log(dir.audit(), SecretBytes(key.view()));
    for (int i = 0; i < 3; ++i) log.append({{"event", "fetch"}, {"pid", i}});
  }
  const std::string old_head = slurp(dir.audit() + ".head");
  const std::string old_log = slurp(dir.audit());
  AuditMark mark;
  {
    AuditLog log(dir.audit(), SecretBytes(key.view()));
    for (int i = 3; i < 6; ++i) log.append({{"event", "fetch"}, {"pid", i}});
    log.sync();
    mark = log.durable_mark();
  }
  REQUIRE(mark.seq == 6);
  REQUIRE(mark.size == slurp(dir.audit()).size());
  const std::string whole_log = slurp(dir.audit());
  CHECK(AuditLog::verify(dir.audit(), key.view(), mark).ok);

  auto expect_found = [&](const std::string& what) {
    INFO(what);
    // Without the mark this passes: the hole this closes.
    const AuditVerdict blind = AuditLog::verify(dir.audit(), key.view());
    CHECK(blind.ok);
    const AuditVerdict v = AuditLog::verify(dir.audit(), key.view(), mark);
    INFO(v.problem);
    CHECK_FALSE(v.ok);
    CHECK(v.problem.find("key store recorded") != std::string::npos);
    // keyd's start records it in the chain: verify fails from then on.
    { AuditLog log(dir.audit(), SecretBytes(key.view()), mark); }
    CHECK(slurp(dir.audit()).find("audit-chain-break") != std::string::npos);
    CHECK_FALSE(AuditLog::verify(dir.audit(), key.view()).ok);
  };
  SECTION("cut back to the entry the old head names") {
    spit(dir.audit(), old_log);
    spit(dir.audit() + ".head", old_head);
    expect_found("log = entries 1..3, head names 3");
  }
  SECTION("cut back past it: the rest chains on from the old head") {
    auto lines = lines_of(whole_log);
    lines.resize(4);
    spit(dir.audit(), join(lines));
    spit(dir.audit() + ".head", old_head);
    expect_found("log = entries 1..4, head names 3");
  }
  SECTION("the whole log intact, an old head") {
    spit(dir.audit() + ".head", old_head);
    const AuditVerdict v = AuditLog::verify(dir.audit(), key.view(), mark);
    CHECK_FALSE(v.ok);
    CHECK(v.problem.find("an old copy of the head") != std::string::npos);
  }
  SECTION("log and head deleted") {
    ::unlink(dir.audit().c_str());
    ::unlink((dir.audit() + ".head").c_str());
    { AuditLog log(dir.audit(), SecretBytes(key.view()), mark); }
    CHECK(slurp(dir.audit()).find("audit-chain-break") != std::string::npos);
    CHECK_FALSE(AuditLog::verify(dir.audit(), key.view(), mark).ok);
  }
  SECTION("a head behind the log after a crash, but not behind the mark, is still no break") {
    const std::string head_at_mark = slurp(dir.audit() + ".head");  // names entry 6
    {
      AuditLog log(dir.audit(), SecretBytes(key.view()), mark);
      log.append({{"event", "fetch"}, {"pid", 7}});
    }
    // As a kill between the write of entry 7 and the head's update leaves it.
    spit(dir.audit() + ".head", head_at_mark);
    const AuditVerdict v = AuditLog::verify(dir.audit(), key.view(), mark);
    INFO(v.problem);
    CHECK(v.ok);
    CHECK(v.head_behind == 1);
    { AuditLog log(dir.audit(), SecretBytes(key.view()), mark); }
    CHECK(slurp(dir.audit()).find("audit-chain-break") == std::string::npos);
    CHECK(AuditLog::verify(dir.audit(), key.view(), mark).ok);
  }
}

TEST_CASE("key store: the audit mark is kept under the store's MAC", "[keystore][audit-mark]") {
  LifecycleDir dir;
  {
    KeyStore store = KeyStore::create(dir.store(), pw("pw"), 1000);
    CHECK(store.audit_mark().seq == 0);
    const std::string before = store.file_text();
    CHECK(before.find("audit_mark") == std::string::npos);  // none yet: the old form
    store.set_audit_mark({42, "ab", 12345});
    CHECK(store.dirty());
    store.flush();
  }
  KeyStore store = KeyStore::open(dir.store(), pw("pw"));
  CHECK(store.audit_mark() == AuditMark{42, "ab", 12345});
}

TEST_CASE("audit log: pending failed unlocks are chained at the next start", "[lifecycle][audit]") {
  LifecycleDir dir;
  SecretBytes key = SecretBytes::random(32);
  { AuditLog log(dir.audit(), SecretBytes(key.view())); }
  AuditLog::record_pending(dir.audit(), {{"event", "unlock-failed"}, {"uid", 0}});
  {
    AuditLog log(dir.audit(), SecretBytes(key.view()));
    CHECK(log.last_seq() == 1);
  }
  CHECK(::access((dir.audit() + ".pending").c_str(), F_OK) != 0);
  const std::string text = slurp(dir.audit());
  CHECK(text.find("unlock-failed") != std::string::npos);
  CHECK(text.find("recorded_unauthenticated") != std::string::npos);
  CHECK(AuditLog::verify(dir.audit(), key.view()).ok);
}

TEST_CASE("audit log: group commit writes a batch at once; an uncommitted batch breaks nothing",
          "[lifecycle][audit]") {
  LifecycleDir dir;
  SecretBytes key = SecretBytes::random(32);
  auto head_seq = [&] { return json::parse(slurp(dir.audit() + ".head"))["seq"].get<uint64_t>(); };
  {
    AuditLog log(dir.audit(), SecretBytes(key.view()));
    for (int i = 0; i < 3; ++i) log.append({{"event", "fetch"}, {"pid", i}});
    // Chained in memory, not yet in the file nor named by the head.
    CHECK(log.last_seq() == 3);
    CHECK(log.pending() == 3);
    CHECK(slurp(dir.audit()).empty());
    CHECK(head_seq() == 0);
    CHECK(log.commit());
    CHECK(log.pending() == 0);
    CHECK(lines_of(slurp(dir.audit())).size() == 3);
    CHECK(head_seq() == 3);
    CHECK(AuditLog::verify(dir.audit(), key.view()).ok);
    CHECK(log.commit());  // nothing pending: nothing written
    CHECK(lines_of(slurp(dir.audit())).size() == 3);

    // A batch still in memory (keyd sends no reply before its commit) is
    // simply absent after a crash: file and head agree on the committed part.
    log.append({{"event", "fetch"}, {"pid", 3}});
    log.append({{"event", "fetch"}, {"pid", 4}});
    AuditVerdict before = AuditLog::verify(dir.audit(), key.view());
    CHECK(before.ok);
    CHECK(before.entries == 3);
    log.sync();
    CHECK(head_seq() == 5);
  }
  AuditVerdict v = AuditLog::verify(dir.audit(), key.view());
  CHECK(v.ok);
  CHECK(v.entries == 5);
  CHECK(log_is_chained_in_order(lines_of(slurp(dir.audit()))));
}

TEST_CASE("lifecycle: a version that keyed derived values is pinned", "[keystore][lifecycle]") {
  LifecycleDir dir;
  KeyId id{};
  {
    KeyStore store = KeyStore::create(dir.store(), pw("pw"), 1000);
    id = store.create_key("k", {}).id;
    store.create_key("plain", {});
    // The first use is on disk at once; later ones only move last_used.
    CHECK(store.record_derivation(id, 1, wire::FetchPurpose::BlindIndex, 1000));
    CHECK_FALSE(store.record_derivation(id, 1, wire::FetchPurpose::BlindIndex, 2000));
    CHECK(store.record_derivation(id, 1, wire::FetchPurpose::Deterministic, 1500));
    CHECK(code_of([&] { store.record_derivation(id, 9, wire::FetchPurpose::BlindIndex, 1); }) ==
          Errc::KeyNotFound);
    // No flush: the crash case. The first uses must survive it.
  }
  KeyStore store = KeyStore::open(dir.store(), pw("pw"));
  const KeyVersion& v1 = store.find("k")->versions[0];
  REQUIRE(v1.blind_index.first_used);
  CHECK(*v1.blind_index.first_used == 1000);
  REQUIRE(v1.deterministic.first_used);
  CHECK(*v1.deterministic.first_used == 1500);
  CHECK(v1.keys_derived_values());
  CHECK_FALSE(store.find("plain")->versions[0].keys_derived_values());
  // The admin view (keyctl show) carries it.
  json meta = key_metadata_json(*store.find("k"));
  CHECK(meta["versions"][0]["blind_index"]["first_used"] == format_timestamp(1000));
  CHECK(meta["versions"][0]["deterministic"]["last_used"] == format_timestamp(1500));

  store.rotate_key("k");
  store.rotate_key("plain");
  // Taken after the rotations: a clock second that passes between them and
  // an earlier "now" would put the retirement in the future (a flaky refusal).
  const RetireGrace no_grace{static_cast<int64_t>(std::time(nullptr)), 0, false};
  const RetireGrace forced{static_cast<int64_t>(std::time(nullptr)), 0, true};
  // Disable and destroy of the pinned version are refused, saying what breaks.
  std::string message;
  try {
    store.destroy_version("k", 1, no_grace);
  } catch (const Error& e) {
    CHECK(e.code() == Errc::InvalidArgument);
    message = e.what();
  }
  CHECK(message.find("deterministic values (colcrypt.encrypt_deterministic) and blind indexes "
                     "(colcrypt.blind_index) of key 'k' unusable") != std::string::npos);
  CHECK(message.find("--force") != std::string::npos);
  CHECK(code_of([&] { store.disable_version("k", 1, no_grace); }) == Errc::InvalidArgument);
  CHECK(store.find("k")->versions[0].state == wire::KeyState::DecryptOnly);
  // A version without such uses is not pinned; --force overrides the pin.
  CHECK(store.disable_version("plain", 1, no_grace).versions[0].state == wire::KeyState::Disabled);
  CHECK(store.destroy_version("k", 1, forced).versions[0].state == wire::KeyState::Destroyed);
}

TEST_CASE("keyd: counting connections get a statement_timeout", "[keyd][count]") {
  const std::string keepalive =
      " keepalives=1 keepalives_idle=5 keepalives_interval=2 keepalives_count=2";
  CHECK(with_statement_timeout("dbname=app port=5433", 1500) ==
        "dbname='app' port='5433' options='-c statement_timeout=1500' connect_timeout=2" +
            keepalive + " tcp_user_timeout=2000");
  // Options given are kept; a URI becomes key=value; quotes are escaped.
  CHECK(with_statement_timeout("postgresql://u@h:5/db?options=-c%20work_mem%3D8MB", 30000) ==
        "user='u' dbname='db' host='h' port='5' options='-c work_mem=8MB -c "
        "statement_timeout=30000' connect_timeout=30" +
            keepalive + " tcp_user_timeout=30000");
  CHECK(with_statement_timeout("dbname='it\\'s' connect_timeout=7", 100) ==
        "connect_timeout='7' dbname='it\\'s' options='-c statement_timeout=100'" + keepalive +
            " tcp_user_timeout=2000");
  // Keepalive settings given are kept, not added twice.
  CHECK(with_statement_timeout("dbname=app keepalives=0 tcp_user_timeout=900", 1500) ==
        "dbname='app' keepalives='0' tcp_user_timeout='900' options='-c statement_timeout=1500' "
        "connect_timeout=2 keepalives_idle=5 keepalives_interval=2 keepalives_count=2");
  CHECK(code_of([] { with_statement_timeout("dbname=", 1); }) != Errc::InvalidArgument);
  CHECK(code_of([] { with_statement_timeout("nonsense", 1); }) == Errc::InvalidArgument);
}

// Writes fail with EFBIG past RLIMIT_FSIZE (SIGXFSZ ignored): a real write
// failure, in this process only.
class FileSizeLimit {
 public:
  explicit FileSizeLimit(rlim_t bytes) {
    ::signal(SIGXFSZ, SIG_IGN);
    ::getrlimit(RLIMIT_FSIZE, &saved_);
    rlimit limited = saved_;
    limited.rlim_cur = bytes;
    ::setrlimit(RLIMIT_FSIZE, &limited);
  }
  ~FileSizeLimit() { ::setrlimit(RLIMIT_FSIZE, &saved_); }

 private:
  rlimit saved_{};
};

TEST_CASE("audit log: a failed append leaves an audit_gap entry that verify reports",
          "[lifecycle][audit]") {
  LifecycleDir dir;
  SecretBytes key = SecretBytes::random(32);
  AuditLog log(dir.audit(), SecretBytes(key.view()));
  for (int i = 0; i < 3; ++i) log.append({{"event", "fetch"}, {"n", i}});
  REQUIRE(log.commit());
  const uint64_t written = log.last_seq();
  const auto size = static_cast<rlim_t>(std::filesystem::file_size(dir.audit()));
  {
    FileSizeLimit limit(size);
    for (int i = 0; i < 4; ++i) log.append({{"event", "fetch"}, {"lost", i}});
    CHECK_FALSE(log.commit());
    CHECK_FALSE(log.writable());
    CHECK(log.last_failure() == std::strerror(EFBIG));
    log.append({{"event", "fetch"}, {"lost", 4}});
    CHECK_FALSE(log.commit());  // still failing: 5 lost in all, one gap
    CHECK(log.loss_events() == 2);
    CHECK(log.lost_entries() == 5);
    // Nothing partial was left behind, and what is there still verifies.
    CHECK(std::filesystem::file_size(dir.audit()) == size);
    CHECK(AuditLog::verify(dir.audit(), key.view()).ok);
  }
  log.append({{"event", "fetch"}, {"after", true}});
  REQUIRE(log.commit());
  CHECK(log.writable());
  const std::vector<std::string> lines = lines_of(slurp(dir.audit()));
  REQUIRE(lines.size() == written + 2);
  json gap = json::parse(lines[written]);
  CHECK(gap["event"] == "audit_gap");
  CHECK(gap["lost"] == 5);
  CHECK(gap["after_seq"] == written);
  CHECK(gap["reason"] == std::strerror(EFBIG));
  CHECK(json::parse(lines.back())["after"] == true);
  // The chain is intact (no tampering) but the loss is reported.
  AuditVerdict v = AuditLog::verify(dir.audit(), key.view());
  CHECK(v.ok);
  CHECK(v.lost == 5);
  REQUIRE(v.gaps.size() == 1);
  CHECK(v.gaps[0].find("5 entries after entry " + std::to_string(written)) != std::string::npos);
  json reply = audit_verdict_json(v, dir.audit());
  CHECK(reply["lost"] == 5);
  CHECK(reply["gaps"].size() == 1);
}

TEST_CASE("audit log: the head is one fixed-size record rewritten in place", "[lifecycle][audit]") {
  LifecycleDir dir;
  SecretBytes key = SecretBytes::random(32);
  AuditLog log(dir.audit(), SecretBytes(key.view()));
  const std::string head = dir.audit() + ".head";
  struct stat before {};
  REQUIRE(::stat(head.c_str(), &before) == 0);
  for (int i = 0; i < 3; ++i) {
    log.append({{"event", "fetch"}, {"n", i}});
    REQUIRE(log.commit());
  }
  struct stat after {};
  REQUIRE(::stat(head.c_str(), &after) == 0);
  CHECK(after.st_ino == before.st_ino);  // no temp file renamed over it per commit
  CHECK(static_cast<size_t>(after.st_size) == kHeadRecordSize);
  CHECK(json::parse(slurp(head))["seq"] == log.last_seq());
  CHECK_FALSE(std::filesystem::exists(head + ".tmp"));
  CHECK(AuditLog::verify(dir.audit(), key.view()).ok);
}

TEST_CASE("audit log: the sync thread fdatasyncs what commit() wrote, off the caller's thread",
          "[lifecycle][audit][audit-sync]") {
  LifecycleDir dir;
  SecretBytes key = SecretBytes::random(32);
  // Declared before the log: its sync thread calls back until the log is gone.
  std::mutex mu;
  std::condition_variable cv;
  int wakeups = 0;
  AuditLog log(dir.audit(), SecretBytes(key.view()));
  // Without the thread, commit() syncs before it returns.
  log.append({{"event", "fetch"}, {"n", 0}});
  REQUIRE(log.commit());
  CHECK(log.synced_seq() == log.written_seq());
  CHECK(log.written_seq() == log.last_seq());

  log.start_sync_thread([&] {
    std::lock_guard<std::mutex> lock(mu);
    ++wakeups;
    cv.notify_all();
  });
  for (int batch = 0; batch < 20; ++batch) {
    for (int i = 0; i < 5; ++i) log.append({{"event", "fetch"}, {"batch", batch}, {"n", i}});
    REQUIRE(log.commit());
    // In the file (a crash of the process keeps it) as soon as commit() returns.
    CHECK(log.written_seq() == log.last_seq());
    CHECK(lines_of(slurp(dir.audit())).size() == log.written_seq());
    CHECK(json::parse(slurp(dir.audit() + ".head"))["seq"].get<uint64_t>() == log.written_seq());
  }
  // The thread catches up with everything written, and says so each time.
  {
    std::unique_lock<std::mutex> lock(mu);
    CHECK(cv.wait_for(lock, std::chrono::seconds(10),
                      [&] { return log.synced_seq() == log.written_seq(); }));
    CHECK(wakeups >= 1);
  }
  CHECK_FALSE(log.sync_failing());
  CHECK_FALSE(log.sync_stalled());
  CHECK(log.loss_events() == 0);
  CHECK(AuditLog::verify(dir.audit(), key.view()).ok);
}

TEST_CASE("audit log: the sync thread reports a failed and a stalled fdatasync, then recovers",
          "[lifecycle][audit][audit-sync]") {
  LifecycleDir dir;
  SecretBytes key = SecretBytes::random(32);
  // Declared before the log: its sync thread uses them until the log is gone.
  std::atomic<int> mode{0};  // 0: real fdatasync, 1: EIO, 2: stall until released
  std::atomic<bool> release{false};
  std::mutex mu;
  std::condition_variable cv;
  int wakeups = 0;
  AuditLog log(dir.audit(), SecretBytes(key.view()));
  log.set_fdatasync_for_tests([&](int fd) {
    if (mode == 1) {
      errno = EIO;
      return -1;
    }
    if (mode == 2) {
      while (!release) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return ::fdatasync(fd);
  });
  log.start_sync_thread([&] {
    std::lock_guard<std::mutex> lock(mu);
    ++wakeups;
    cv.notify_all();
  });
  auto wait_for = [&](auto done) {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, std::chrono::seconds(10), done);
  };

  // A failed fdatasync: counted as a loss (keyd withholds keys, failing
  // closed), reported, retried; the entries stay written, not synced.
  mode = 1;
  log.append({{"event", "fetch"}, {"n", 1}});
  REQUIRE(log.commit());  // written: commit() does not wait for the disk
  CHECK(wait_for([&] { return log.sync_failing(); }));
  CHECK(log.loss_events() >= 1);
  CHECK(log.synced_seq() < log.written_seq());
  CHECK(log.last_failure() == std::string("fdatasync: ") + std::strerror(EIO));
  // The retry that succeeds clears it and covers what was written.
  mode = 0;
  CHECK(wait_for([&] { return !log.sync_failing() && log.synced_seq() == log.written_seq(); }));

  // A stalled fdatasync is reported once it has run kAuditSyncStallMs.
  mode = 2;
  log.append({{"event", "fetch"}, {"n", 2}});
  REQUIRE(log.commit());
  const auto start = std::chrono::steady_clock::now();
  while (!log.sync_stalled() &&
         std::chrono::steady_clock::now() - start < std::chrono::seconds(10)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  CHECK(log.sync_stalled());
  CHECK(std::chrono::steady_clock::now() - start >= std::chrono::milliseconds(kAuditSyncStallMs));
  CHECK(log.synced_seq() < log.written_seq());
  release = true;
  CHECK(wait_for([&] { return log.synced_seq() == log.written_seq(); }));
  CHECK_FALSE(log.sync_stalled());
  mode = 0;
  CHECK(AuditLog::verify(dir.audit(), key.view()).ok);
}
