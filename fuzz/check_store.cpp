#include <nlohmann/json.hpp>
#include <string>

#include "checks.hpp"
#include "core/error.hpp"
#include "fixtures.hpp"
#include "keyd/store.hpp"
#include "scratch_dir.hpp"

namespace colcrypt::fuzz {

namespace {

keyd::MasterSecret test_secret() {
  keyd::MasterSecret secret;
  secret.kind = keyd::MasterSecret::Kind::KeyFile;
  secret.bytes = SecretBytes(test_kek());
  return secret;
}

enum class Outcome { Opened, Refused, Wrong };

// Opens the store file `text` as keyd does at start; on success, text_out is
// what keyd would write back.
Outcome open_store(const std::string& text, std::string& text_out) {
  write_scratch_file(keyd::kStoreFileName, text);
  try {
    const keyd::KeyStore store = keyd::KeyStore::open(scratch_dir(), test_secret());
    text_out = store.file_text();
    return Outcome::Opened;
  } catch (const Error& e) {
    return e.code() == Errc::StoreCorrupt || e.code() == Errc::WrongMasterKey ? Outcome::Refused
                                                                              : Outcome::Wrong;
  }
}

}  // namespace

// data[0] even: the rest is the file as it is on disk. Odd: the rest is the
// store's JSON, signed here with the test KEK as keyd would sign it, so that
// the fuzzer reaches the parsing behind the checksum and the MAC.
bool check_store(const uint8_t* data, size_t size) {
  if (size == 0) return true;
  std::string text(reinterpret_cast<const char*>(data + 1), size - 1);
  if (data[0] & 1) {
    nlohmann::json doc = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (doc.is_discarded() || !doc.is_object()) return true;
    try {
      text = keyd::signed_store_text(std::move(doc), keyd::store_mac_key(test_kek()).view());
    } catch (const nlohmann::json::exception&) {
      return true;  // not printable as keyd prints (invalid UTF-8): keyd never wrote it
    }
  }
  std::string written;
  switch (open_store(text, written)) {
    case Outcome::Wrong:
      return false;
    case Outcome::Refused:
      return true;
    case Outcome::Opened:
      break;
  }
  // What keyd writes back it reads back, unchanged.
  std::string rewritten;
  return open_store(written, rewritten) == Outcome::Opened && rewritten == written;
}

}  // namespace colcrypt::fuzz
