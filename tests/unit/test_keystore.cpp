// Key store tests: persistence, master secrets, tamper and corruption
// detection, permissions, atomic writes, rotation, key wrapping bound to id
// and version.
#include <openssl/evp.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/error.hpp"
#include "keyd/store.hpp"
#include "support.hpp"

using namespace colcrypt;
using namespace colcrypt::keyd;
using nlohmann::json;

namespace {

constexpr uint32_t kTestIterations = 1000;

class TempDir {
 public:
  TempDir() {
    char pattern[] = "/tmp/colcrypt-keystore-test-XXXXXX";
    if (!::mkdtemp(pattern)) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string store() const { return path_ + "/store"; }
  std::string store_file() const { return store() + "/" + kStoreFileName; }

 private:
  std::string path_;
};

MasterSecret password(const std::string& text) {
  MasterSecret s;
  s.kind = MasterSecret::Kind::Password;
  s.bytes = SecretBytes(ByteView::of(text));
  return s;
}

MasterSecret key_file_secret(uint8_t fill) {
  MasterSecret s;
  s.kind = MasterSecret::Kind::KeyFile;
  s.bytes = SecretBytes(32);
  for (size_t i = 0; i < 32; ++i) s.bytes.data()[i] = static_cast<uint8_t>(fill + i);
  return s;
}

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_all(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << data;
}

std::vector<uint8_t> copy_of(const SecretBytes& s) {
  return std::vector<uint8_t>(s.data(), s.data() + s.size());
}

Errc open_error(const std::string& dir, const MasterSecret& secret) {
  try {
    KeyStore::open(dir, secret);
  } catch (const Error& e) {
    return e.code();
  }
  FAIL("the store opened");
  return Errc::Internal;
}

std::string sha256_hex(const std::string& data) {
  unsigned char out[32];
  unsigned int len = 0;
  EVP_Digest(data.data(), data.size(), out, &len, EVP_sha256(), nullptr);
  static const char digits[] = "0123456789abcdef";
  std::string hex;
  for (unsigned i = 0; i < len; ++i) {
    hex.push_back(digits[out[i] >> 4]);
    hex.push_back(digits[out[i] & 0xf]);
  }
  return hex;
}

// Edits the store like an attacker who knows the (unkeyed) checksum but not
// the KEK: the edit passes every check except the MAC.
void edit_store(const std::string& path, const std::function<void(json&)>& edit) {
  json doc = json::parse(read_all(path));
  edit(doc);
  doc.erase("checksum");
  doc["checksum"] = sha256_hex(doc.dump());
  write_all(path, doc.dump(2) + "\n");
}

// A store with two keys, "alpha" (rotated once) and "beta".
void make_two_key_store(const TempDir& dir, const MasterSecret& secret) {
  KeyStore store = KeyStore::create(dir.store(), secret, kTestIterations);
  store.create_key("alpha", {});
  store.create_key("beta", {});
  store.rotate_key("alpha");
}

}  // namespace

TEST_CASE("key store: create and reopen with a password", "[keystore]") {
  TempDir dir;
  std::vector<uint8_t> key_bytes;
  KeyId id{};
  {
    KeyStore store = KeyStore::create(dir.store(), password("correct horse"), kTestIterations);
    CHECK(store.keys().empty());
    const KeyRecord& k = store.create_key("ssn", {});
    id = k.id;
    CHECK(k.name == "ssn");
    CHECK(k.algorithm == "AES-256-GCM");
    CHECK(k.primary_version == 1);
    CHECK(k.rotation_interval_days == kDefaultRotationIntervalDays);
    CHECK_FALSE(k.expires_at);
    CHECK_FALSE(k.last_used);
    CHECK(k.usage_count == 0);
    REQUIRE(k.versions.size() == 1);
    CHECK(k.versions[0].state == wire::KeyState::Active);
    key_bytes = copy_of(store.unwrap(k, 1));
    CHECK(key_bytes.size() == 32);
  }
  struct stat st {};
  REQUIRE(::stat(dir.store().c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0700);
  REQUIRE(::stat(dir.store_file().c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);

  KeyStore store = KeyStore::open(dir.store(), password("correct horse"));
  CHECK(store.kek_source() == MasterSecret::Kind::Password);
  CHECK(store.pbkdf2_iterations() == kTestIterations);
  const KeyRecord* k = store.find("ssn");
  REQUIRE(k != nullptr);
  CHECK(k->id == id);
  CHECK(store.find(id) == k);
  CHECK(copy_of(store.unwrap(*k, 1)) == key_bytes);
}

TEST_CASE("key store: create and reopen with a master key file", "[keystore]") {
  TempDir dir;
  std::vector<uint8_t> key_bytes;
  {
    KeyStore store = KeyStore::create(dir.store(), key_file_secret(7), kTestIterations);
    key_bytes = copy_of(store.unwrap(store.create_key("k1", {}), 1));
  }
  KeyStore store = KeyStore::open(dir.store(), key_file_secret(7));
  CHECK(store.kek_source() == MasterSecret::Kind::KeyFile);
  REQUIRE(store.find("k1"));
  CHECK(copy_of(store.unwrap(*store.find("k1"), 1)) == key_bytes);
  // The file names no password parameters for a key-file store.
  json doc = json::parse(read_all(dir.store_file()));
  CHECK(doc["kek"]["source"] == "keyfile");
  CHECK_FALSE(doc["kek"].contains("salt"));
}

TEST_CASE("key store: a wrong master secret is refused", "[keystore]") {
  TempDir dir;
  make_two_key_store(dir, password("right"));
  CHECK(open_error(dir.store(), password("wrong")) == Errc::WrongMasterKey);
  CHECK(open_error(dir.store(), password("righ")) == Errc::WrongMasterKey);
  CHECK(open_error(dir.store(), key_file_secret(1)) == Errc::WrongMasterKey);

  TempDir kdir;
  make_two_key_store(kdir, key_file_secret(1));
  CHECK(open_error(kdir.store(), key_file_secret(2)) == Errc::WrongMasterKey);
  CHECK(open_error(kdir.store(), password("right")) == Errc::WrongMasterKey);
  // The right secret still works after the failed attempts.
  CHECK_NOTHROW(KeyStore::open(kdir.store(), key_file_secret(1)));
}

TEST_CASE("key store: every flipped byte is detected", "[keystore]") {
  TempDir dir;
  make_two_key_store(dir, password("pw"));
  const std::string good = read_all(dir.store_file());
  REQUIRE(good.size() > 500);
  // Flip in place (no truncation: ext4 would flush on every rewrite).
  std::fstream file(dir.store_file(), std::ios::in | std::ios::out | std::ios::binary);
  auto put = [&](size_t at, char c) {
    file.seekp(static_cast<std::streamoff>(at));
    file.put(c);
    file.flush();
  };
  for (size_t i = 0; i < good.size(); ++i) {
    put(i, static_cast<char>(good[i] ^ 0x01));
    INFO("byte " << i << " of " << good.size());
    CHECK(open_error(dir.store(), password("pw")) == Errc::StoreCorrupt);
    put(i, good[i]);
  }
  file.close();
  REQUIRE(read_all(dir.store_file()) == good);
  write_all(dir.store_file(), good);
  CHECK_NOTHROW(KeyStore::open(dir.store(), password("pw")));
}

TEST_CASE("key store: truncated and garbled files are detected", "[keystore]") {
  TempDir dir;
  make_two_key_store(dir, password("pw"));
  const std::string good = read_all(dir.store_file());
  for (size_t len :
       {size_t{0}, size_t{1}, good.size() / 3, good.size() / 2, good.size() - 2, good.size() - 1}) {
    write_all(dir.store_file(), good.substr(0, len));
    INFO("truncated to " << len);
    CHECK(open_error(dir.store(), password("pw")) == Errc::StoreCorrupt);
  }
  for (const std::string& junk : {std::string("{}\n"), std::string("[]\n"), std::string("null\n"),
                                  std::string(4096, '\0'), good + good}) {
    write_all(dir.store_file(), junk);
    CHECK(open_error(dir.store(), password("pw")) == Errc::StoreCorrupt);
  }
  try {
    write_all(dir.store_file(), good.substr(0, good.size() / 2));
    KeyStore::open(dir.store(), password("pw"));
    FAIL("opened");
  } catch (const Error& e) {
    CHECK_THAT(e.what(), Catch::Contains("is corrupted") && Catch::Contains(kStoreFileName));
  }
}

TEST_CASE("key store: edited metadata fails the MAC", "[keystore]") {
  TempDir dir;
  make_two_key_store(dir, password("pw"));
  const std::string good = read_all(dir.store_file());
  const std::vector<std::pair<const char*, std::function<void(json&)>>> edits = {
      {"usage_count", [](json& d) { d["keys"][0]["usage_count"] = 12345; }},
      {"rotation interval", [](json& d) { d["keys"][0]["rotation_interval_days"] = 3650; }},
      {"expires_at", [](json& d) { d["keys"][1]["expires_at"] = "2099-01-01T00:00:00Z"; }},
      {"name", [](json& d) { d["keys"][1]["name"] = "gamma"; }},
      {"primary back to v1",
       [](json& d) {
         d["keys"][0]["primary_version"] = 1;
         d["keys"][0]["versions"][0]["state"] = "active";
         d["keys"][0]["versions"][1]["state"] = "decrypt-only";
       }},
      {"drop a version", [](json& d) { d["keys"][0]["versions"].erase(0); }},
      {"drop a key", [](json& d) { d["keys"].erase(1); }},
      {"iterations", [](json& d) { d["kek"]["iterations"] = 1001; }},
  };
  for (const auto& [what, edit] : edits) {
    write_all(dir.store_file(), good);
    edit_store(dir.store_file(), edit);
    INFO(what);
    Errc code = open_error(dir.store(), password("pw"));
    // Editing the KDF parameters changes the KEK itself: wrong-key, not MAC.
    if (std::string(what) == "iterations") {
      CHECK(code == Errc::WrongMasterKey);
    } else {
      CHECK(code == Errc::StoreCorrupt);
    }
  }
  // Reformatting alone (same content, other whitespace) is refused too.
  write_all(dir.store_file(), json::parse(good).dump() + "\n");
  CHECK(open_error(dir.store(), password("pw")) == Errc::StoreCorrupt);
}

TEST_CASE("key store: wrapped keys are bound to key id and version", "[keystore]") {
  TempDir dir;
  make_two_key_store(dir, password("pw"));
  const std::string good = read_all(dir.store_file());
  // Swapping two wrapped keys in the file is detected.
  edit_store(dir.store_file(), [](json& d) {
    std::swap(d["keys"][0]["versions"][0]["wrapped"], d["keys"][0]["versions"][1]["wrapped"]);
  });
  CHECK(open_error(dir.store(), password("pw")) == Errc::StoreCorrupt);
  write_all(dir.store_file(), good);
  edit_store(dir.store_file(), [](json& d) {
    std::swap(d["keys"][0]["versions"][1]["wrapped"], d["keys"][1]["versions"][0]["wrapped"]);
  });
  CHECK(open_error(dir.store(), password("pw")) == Errc::StoreCorrupt);

  // And the AAD itself binds them, independently of the store MAC.
  SecretBytes kek = SecretBytes::random(32);
  SecretBytes key = SecretBytes::random(32);
  KeyId a = new_key_id();
  KeyId b = new_key_id();
  auto wrapped = wrap_key(kek.view(), a, 3, key.view());
  REQUIRE(wrapped.size() == kWrappedKeySize);
  SecretBytes back = unwrap_key(kek.view(), a, 3, ByteView(wrapped));
  REQUIRE(back.size() == 32);
  CHECK(constant_time_equal(back.view(), key.view()));
  CHECK(unwrap_key(kek.view(), a, 4, ByteView(wrapped)).empty());
  CHECK(unwrap_key(kek.view(), b, 3, ByteView(wrapped)).empty());
  SecretBytes other_kek = SecretBytes::random(32);
  CHECK(unwrap_key(other_kek.view(), a, 3, ByteView(wrapped)).empty());
  for (size_t i = 0; i < wrapped.size(); ++i) {
    auto bad = wrapped;
    bad[i] ^= 0x80;
    CHECK(unwrap_key(kek.view(), a, 3, ByteView(bad)).empty());
  }
  // Each wrap draws a fresh nonce.
  CHECK(wrap_key(kek.view(), a, 3, key.view()) != wrapped);
}

TEST_CASE("key store: insecure permissions are refused", "[keystore]") {
  TempDir dir;
  make_two_key_store(dir, password("pw"));
  SECTION("store file 0644") {
    REQUIRE(::chmod(dir.store_file().c_str(), 0644) == 0);
    CHECK(open_error(dir.store(), password("pw")) == Errc::InsecurePermissions);
  }
  SECTION("store file 0640") {
    REQUIRE(::chmod(dir.store_file().c_str(), 0640) == 0);
    CHECK(open_error(dir.store(), password("pw")) == Errc::InsecurePermissions);
  }
  SECTION("store directory 0755") {
    REQUIRE(::chmod(dir.store().c_str(), 0755) == 0);
    CHECK(open_error(dir.store(), password("pw")) == Errc::InsecurePermissions);
  }
  SECTION("store directory 0701") {
    REQUIRE(::chmod(dir.store().c_str(), 0701) == 0);
    CHECK(open_error(dir.store(), password("pw")) == Errc::InsecurePermissions);
  }
  SECTION("store file owned by another user") {
    if (::geteuid() != 0) return;  // only root can give files away
    REQUIRE(::chown(dir.store_file().c_str(), 12345, static_cast<gid_t>(-1)) == 0);
    CHECK(open_error(dir.store(), password("pw")) == Errc::InsecurePermissions);
  }
  SECTION("store file is a symlink") {
    std::string real = dir.path() + "/elsewhere.json";
    REQUIRE(::rename(dir.store_file().c_str(), real.c_str()) == 0);
    REQUIRE(::symlink(real.c_str(), dir.store_file().c_str()) == 0);
    CHECK(open_error(dir.store(), password("pw")) == Errc::InsecurePermissions);
  }
  SECTION("a new store is not created in an open directory") {
    TempDir other;
    std::string open_dir = other.path() + "/open";
    REQUIRE(::mkdir(open_dir.c_str(), 0755) == 0);
    REQUIRE(::chmod(open_dir.c_str(), 0755) == 0);
    try {
      KeyStore::create(open_dir, password("pw"), kTestIterations);
      FAIL("created");
    } catch (const Error& e) {
      CHECK(e.code() == Errc::InsecurePermissions);
      CHECK_THAT(e.what(), Catch::Contains("0755"));
    }
  }
}

TEST_CASE("key store: a new store needs a missing or empty directory", "[keystore]") {
  TempDir dir;
  CHECK_FALSE(KeyStore::exists(dir.store()));
  REQUIRE(::mkdir(dir.store().c_str(), 0700) == 0);
  CHECK_FALSE(KeyStore::exists(dir.store()));
  write_all(dir.store() + "/unrelated.txt", "x");
  CHECK_THROWS_MATCHES(
      KeyStore::exists(dir.store()), Error,
      Catch::Predicate<Error>([](const Error& e) { return e.code() == Errc::InvalidArgument; }));
  ::unlink((dir.store() + "/unrelated.txt").c_str());
  KeyStore::create(dir.store(), password("pw"), kTestIterations);
  CHECK(KeyStore::exists(dir.store()));
}

TEST_CASE("key store: one process at a time", "[keystore]") {
  TempDir dir;
  KeyStore store = KeyStore::create(dir.store(), password("pw"), kTestIterations);
  try {
    KeyStore::open(dir.store(), password("pw"));
    FAIL("opened twice");
  } catch (const StoreInUse& e) {
    CHECK_THAT(e.what(), Catch::Contains("in use"));
  }
}

TEST_CASE("key store: writes are atomic", "[keystore]") {
  TempDir dir;
  make_two_key_store(dir, password("pw"));
  const std::string before = read_all(dir.store_file());
  const std::string tmp = dir.store() + "/" + kStoreTempFileName;

  SECTION("a temp file left by a crash is ignored and removed") {
    write_all(tmp, "{\"half written");
    ::chmod(tmp.c_str(), 0600);
    KeyStore store = KeyStore::open(dir.store(), password("pw"));
    CHECK(store.keys().size() == 2);
    CHECK(::access(tmp.c_str(), F_OK) != 0);
    CHECK(read_all(dir.store_file()) == before);
  }

  SECTION("a failing write leaves the old store, on disk and in memory") {
    KeyStore store = KeyStore::open(dir.store(), password("pw"));
    // Make every write beyond a few bytes fail (EFBIG) while the store saves.
    struct sigaction ignore {
    }, saved{};
    ignore.sa_handler = SIG_IGN;
    ::sigaction(SIGXFSZ, &ignore, &saved);
    struct rlimit old_limit {};
    ::getrlimit(RLIMIT_FSIZE, &old_limit);
    struct rlimit small = old_limit;
    small.rlim_cur = 64;
    REQUIRE(::setrlimit(RLIMIT_FSIZE, &small) == 0);
    Errc create_code = Errc::Internal, rotate_code = Errc::Internal;
    try {
      store.create_key("gamma", {});
    } catch (const Error& e) {
      create_code = e.code();
    }
    try {
      store.rotate_key("beta");
    } catch (const Error& e) {
      rotate_code = e.code();
    }
    ::setrlimit(RLIMIT_FSIZE, &old_limit);
    ::sigaction(SIGXFSZ, &saved, nullptr);

    CHECK(create_code == Errc::Io);
    CHECK(rotate_code == Errc::Io);
    CHECK(store.find("gamma") == nullptr);
    CHECK(store.find("beta")->primary_version == 1);
    CHECK(read_all(dir.store_file()) == before);
    CHECK(::access(tmp.c_str(), F_OK) != 0);

    // Once writes work again, so does the store.
    store.create_key("gamma", {});
    store.rotate_key("beta");
    CHECK(read_all(dir.store_file()) != before);
  }
}

TEST_CASE("key store: rotation keeps old versions decryptable", "[keystore]") {
  TempDir dir;
  KeyId id{};
  std::vector<uint8_t> v1, v2, v3;
  {
    KeyStore store = KeyStore::create(dir.store(), password("pw"), kTestIterations);
    const KeyRecord& k = store.create_key("ssn", {});
    id = k.id;
    v1 = copy_of(store.unwrap(k, 1));
    const KeyRecord& r1 = store.rotate_key("ssn");
    CHECK(r1.id == id);  // the id is stable across rotations
    CHECK(r1.primary_version == 2);
    v2 = copy_of(store.unwrap(r1, 2));
    CHECK(copy_of(store.unwrap(r1, 1)) == v1);
    const KeyRecord& r2 = store.rotate_key("ssn");
    v3 = copy_of(store.unwrap(r2, 3));
    CHECK(v1 != v2);
    CHECK(v2 != v3);
    CHECK_THROWS_MATCHES(
        store.rotate_key("nope"), Error,
        Catch::Predicate<Error>([](const Error& e) { return e.code() == Errc::KeyNotFound; }));
  }
  KeyStore store = KeyStore::open(dir.store(), password("pw"));
  const KeyRecord* k = store.find(id);
  REQUIRE(k != nullptr);
  CHECK(k->primary_version == 3);
  REQUIRE(k->versions.size() == 3);
  CHECK(k->versions[0].state == wire::KeyState::DecryptOnly);
  CHECK(k->versions[1].state == wire::KeyState::DecryptOnly);
  CHECK(k->versions[2].state == wire::KeyState::Active);
  CHECK(copy_of(store.unwrap(*k, 1)) == v1);
  CHECK(copy_of(store.unwrap(*k, 2)) == v2);
  CHECK(copy_of(store.unwrap(*k, 3)) == v3);
  CHECK_THROWS_AS(store.unwrap(*k, 4), Error);
}

TEST_CASE("key store: key creation validates its input", "[keystore]") {
  TempDir dir;
  KeyStore store = KeyStore::create(dir.store(), password("pw"), kTestIterations);
  auto code_of = [&](const std::string& name, const NewKeyOptions& o) {
    try {
      store.create_key(name, o);
    } catch (const Error& e) {
      return e.code();
    }
    return Errc::Internal;
  };
  CHECK(code_of("", {}) == Errc::InvalidArgument);
  CHECK(code_of("has space", {}) == Errc::InvalidArgument);
  CHECK(code_of("-dash", {}) == Errc::InvalidArgument);
  CHECK(code_of(std::string(64, 'a'), {}) == Errc::InvalidArgument);
  NewKeyOptions zero_days;
  zero_days.rotation_interval_days = 0;
  CHECK(code_of("ok1", zero_days) == Errc::InvalidArgument);
  NewKeyOptions past;
  past.expires_at = 1000;
  CHECK(code_of("ok2", past) == Errc::InvalidArgument);
  CHECK(store.keys().empty());

  store.set_default_rotation_interval_days(30);
  NewKeyOptions full;
  full.expires_at = *parse_timestamp("2099-12-31T23:59:59Z");
  const KeyRecord& k = store.create_key("tenant.a_1-x", full);
  CHECK(k.rotation_interval_days == 30);
  CHECK(k.expires_at == full.expires_at);
  CHECK(code_of("tenant.a_1-x", {}) == Errc::AlreadyExists);
  CHECK(store.keys().size() == 1);
}

TEST_CASE("key store: usage is counted in memory and flushed lazily", "[keystore]") {
  TempDir dir;
  KeyId id{};
  {
    KeyStore store = KeyStore::create(dir.store(), password("pw"), kTestIterations);
    id = store.create_key("k", {}).id;
    const std::string saved = read_all(dir.store_file());
    CHECK_FALSE(store.dirty());
    store.record_use(id, 1800000000);
    store.record_use(id, 1800000005);
    CHECK(store.dirty());
    // A fetch updates last_used; usage_count counts encryptions (charge_uses).
    CHECK(store.find(id)->usage_count == 0);
    CHECK(read_all(dir.store_file()) == saved);  // no write per fetch
    store.flush();
    CHECK_FALSE(store.dirty());
  }
  KeyStore store = KeyStore::open(dir.store(), password("pw"));
  CHECK(store.find(id)->usage_count == 0);
  CHECK(store.find(id)->last_used == 1800000005);
}

TEST_CASE("key store: timestamps", "[keystore]") {
  CHECK(format_timestamp(0) == "1970-01-01T00:00:00Z");
  CHECK(format_timestamp(1795960800) == "2026-11-29T14:00:00Z");
  CHECK(parse_timestamp("2026-11-29T14:00:00Z") == 1795960800);
  CHECK(parse_timestamp("2026-11-29T14:00Z") == 1795960800);
  CHECK(parse_timestamp("2026-11-29T15:00:00+01:00") == 1795960800);
  CHECK(parse_timestamp("2026-11-29T13:30:00-0030") == 1795960800);
  CHECK(parse_timestamp("2026-11-29T14:00:00.250Z") == 1795960800);
  CHECK(parse_timestamp("2026-11-29") == 1795910400);
  CHECK(parse_timestamp("2024-02-29") == 1709164800);
  CHECK_FALSE(parse_timestamp("2026-02-29"));
  CHECK_FALSE(parse_timestamp("2026-13-01"));
  CHECK_FALSE(parse_timestamp("2026-11-29T24:00:00Z"));
  CHECK_FALSE(parse_timestamp("2026-11-29T14:00:00Zjunk"));
  CHECK_FALSE(parse_timestamp("yesterday"));
  CHECK_FALSE(parse_timestamp(""));
  for (int64_t t : {int64_t{0}, int64_t{951782400}, int64_t{1795960800}, int64_t{4102444799}}) {
    CHECK(parse_timestamp(format_timestamp(t)) == t);
  }
}

TEST_CASE("key store: every timestamp that parses is written so that it parses again",
          "[keystore]") {
  // Years below 1000 were written with fewer than four digits ("999-01-01..."):
  // a key created with such an expiry made the store unreadable at the next start.
  for (const char* text :
       {"0999-01-01", "0001-06-15T12:00:00Z", "0000-01-01", "9999-12-31T23:59:59Z"}) {
    INFO(text);
    const auto t = parse_timestamp(text);
    REQUIRE(t);
    CHECK(format_timestamp(*t).size() == 20);
    CHECK(parse_timestamp(format_timestamp(*t)) == t);
  }
  CHECK(format_timestamp(*parse_timestamp("0999-01-01")) == "0999-01-01T00:00:00Z");
  // An offset or a leap second that leaves years 0000..9999 is refused.
  CHECK_FALSE(parse_timestamp("0000-01-01T00:00+01:00"));
  CHECK_FALSE(parse_timestamp("9999-12-31T23:59:60Z"));
  CHECK_FALSE(parse_timestamp("9999-12-31T23:00-02:00"));
}

TEST_CASE("file_text is what a save writes, and reopens unchanged", "[keystore]") {
  TempDir dir;
  const MasterSecret secret = key_file_secret(7);
  std::string written;
  {
    KeyStore store = KeyStore::create(dir.store(), secret, kTestIterations);
    store.create_key("customer_data", {});
    store.rotate_key("customer_data");
    std::ifstream in(dir.store_file(), std::ios::binary);
    written.assign(std::istreambuf_iterator<char>(in), {});
    CHECK(store.file_text() == written);
  }
  const KeyStore reopened = KeyStore::open(dir.store(), secret);
  CHECK(reopened.file_text() == written);
}

TEST_CASE("signed_store_text signs as a save does: edits need the KEK", "[keystore]") {
  TempDir dir;
  const MasterSecret secret = key_file_secret(9);
  {
    KeyStore store = KeyStore::create(dir.store(), secret, kTestIterations);
    store.create_key("customer_data", {});
  }
  std::ifstream in(dir.store_file(), std::ios::binary);
  json doc = json::parse(std::string(std::istreambuf_iterator<char>(in), {}));
  doc["keys"][0]["rotation_interval_days"] = 7;
  // Signed with the right KEK, the edit is a valid store ...
  {
    std::ofstream(dir.store_file(), std::ios::binary | std::ios::trunc)
        << signed_store_text(doc, store_mac_key(secret.bytes.view()).view());
    const KeyStore store = KeyStore::open(dir.store(), secret);
    CHECK(store.find("customer_data")->rotation_interval_days == 7);
  }
  // ... signed with another, it is refused.
  const MasterSecret other = key_file_secret(10);
  std::ofstream(dir.store_file(), std::ios::binary | std::ios::trunc)
      << signed_store_text(doc, store_mac_key(other.bytes.view()).view());
  REQUIRE_ERRC(KeyStore::open(dir.store(), secret), Errc::StoreCorrupt);
}
