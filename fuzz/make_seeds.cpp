// Writes the seed corpora (fuzz/corpus/TARGET/) from real values: envelopes
// and deterministic values sealed under the fixtures' keys, their text form,
// a frame of every wire message type, a key store and an audit log written by
// keyd's own code. Usage: colcrypt-fuzz-seeds DIR (normally fuzz/corpus).
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/envelope.hpp"
#include "core/secure_memory.hpp"
#include "core/wire.hpp"
#include "fixtures.hpp"
#include "keyd/audit.hpp"
#include "keyd/store.hpp"
#include "scratch_dir.hpp"

using namespace colcrypt;
using namespace colcrypt::fuzz;

namespace {

std::string out_dir;

void seed(const std::string& target, const std::string& name, const std::string& bytes) {
  const std::string dir = out_dir + "/" + target;
  ::mkdir(dir.c_str(), 0755);
  std::ofstream(dir + "/" + name, std::ios::binary) << bytes;
}

template <class Bytes>
std::string str(const Bytes& b) {
  return std::string(reinterpret_cast<const char*>(b.data()), b.size());
}

void wire_seeds() {
  wire::KeyReply reply;
  reply.id = test_key_id();
  reply.version = kTestKeyVersion;
  reply.state = wire::KeyState::DecryptOnly;
  reply.name = "customer_data";
  reply.key = SecretBytes(test_key());
  const std::vector<std::pair<std::string, std::string>> frames = {
      {"fetch_primary", str(wire::encode_fetch_primary("customer_data"))},
      {"fetch_version", str(wire::encode_fetch_version(test_key_id(), 3))},
      {"fetch_version_for",
       str(wire::encode_fetch_version(test_key_id(), 1, wire::FetchPurpose::BlindIndex))},
      {"fetch_primary_block", str(wire::encode_fetch_primary_block("customer_data", 1000))},
      {"admin", str(wire::encode_admin(R"({"op":"list"})"))},
      {"admin_result", str(wire::encode_admin_result(R"({"ok":true,"keys":[]})"))},
      {"denial_report",
       str(wire::encode_denial_report({"customer_data", "decrypt", "alice", "app"}))},
      {"key", str(wire::encode_key_reply(reply))},
      {"key_grant", str(wire::encode_key_grant(reply, 500))},
      {"failure", str(wire::encode_failure(wire::FailureCode::Denied, "permission denied"))},
      {"ack", str(wire::encode_ack())},
  };
  std::string all;
  for (const auto& [name, frame] : frames) {
    seed("wire", name, std::string(1, '\x00') + frame);  // read whole frames
    all += frame;
  }
  seed("wire", "all_in_3_byte_reads", std::string(1, '\x02') + all);
}

void store_and_audit_seeds() {
  keyd::MasterSecret secret;
  secret.kind = keyd::MasterSecret::Kind::KeyFile;
  secret.bytes = SecretBytes(test_kek());
  const std::string dir = scratch_dir() + "/store";
  {
    keyd::KeyStore store = keyd::KeyStore::create(dir, secret, keyd::kMinPbkdf2Iterations);
    store.create_key("customer_data", {});
    store.create_key("payroll", {});
    store.rotate_key("customer_data");
    store.rotate_key("customer_data");
    const std::string text = store.file_text();
    seed("store", "two_keys_raw", "\x00" + text);
    seed("store", "two_keys_signed", "\x01" + text);
  }
  {
    const keyd::KeyStore store = keyd::KeyStore::open(dir, secret);
    nlohmann::json doc = nlohmann::json::parse(store.file_text());
    doc["keys"] = nlohmann::json::array();
    seed("store", "no_keys_signed", "\x01" + doc.dump(2) + "\n");
  }

  const std::string log_path = scratch_dir() + "/audit.log";
  {
    keyd::AuditLog log(log_path, keyd::audit_mac_key(test_kek()));
    log.append({{"event", "fetch"}, {"key", "customer_data"}, {"version", 3}, {"uid", 26}});
    log.append({{"event", "admin"}, {"op", "rotate"}, {"key", "customer_data"}, {"ok", true}});
    log.append({{"event", "audit_gap"}, {"lost", 2}, {"after_seq", 2}, {"reason", "ENOSPC"}});
    log.sync();
  }
  std::ifstream log_in(log_path, std::ios::binary), head_in(log_path + ".head", std::ios::binary);
  const std::string log_text((std::istreambuf_iterator<char>(log_in)), {});
  const std::string head_text((std::istreambuf_iterator<char>(head_in)), {});
  std::string hostile = "\x00";
  hostile += static_cast<char>(head_text.size() >> 8);
  hostile += static_cast<char>(head_text.size() & 0xFF);
  seed("audit", "chain_as_files", hostile + head_text + log_text);
  seed("audit", "events_flip_none",
       std::string("\x01\x00\x10\x00", 4) +
           "{\"event\":\"fetch\",\"key\":\"customer_data\",\"version\":3}\n"
           "{\"event\":\"refused_peer\",\"uid\":1000}\n");
  seed("audit", "events_flip_one",
       std::string("\x01\x00\x05\x20", 4) +
           "{\"event\":\"admin\",\"op\":\"create\",\"key\":\"k\"}\n");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: colcrypt-fuzz-seeds DIR\n";
    return 64;
  }
  out_dir = argv[1];
  ::mkdir(out_dir.c_str(), 0755);
  int i = 0;
  for (const auto& f : envelope_fixtures()) {
    seed("envelope", "sealed_" + std::to_string(i), str(f.value));
    if (i < 4) seed("recv", "envelope_" + std::to_string(i), str(f.value));
    if (i < 4) seed("text", "envelope_" + std::to_string(i), encode_text(ByteView(f.value)));
    ++i;
  }
  seed("text", "empty", "colcrypt:");
  i = 0;
  for (const auto& f : deterministic_fixtures()) {
    seed("deterministic", "sealed_" + std::to_string(i), str(f.value));
    if (i < 2) seed("recv", "deterministic_" + std::to_string(i), str(f.value));
    ++i;
  }
  wire_seeds();
  store_and_audit_seeds();
  return 0;
}
