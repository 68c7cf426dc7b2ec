// The keyd wire protocol (docs/protocol.md): frames of
//   u32 big-endian length of what follows | u8 message type | body
// with a hard cap on the length. Strings are u16 big-endian length + bytes.
#pragma once
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/bytes.hpp"
#include "core/envelope.hpp"
#include "core/secure_memory.hpp"

namespace colcrypt::wire {

constexpr uint32_t kMaxFrameSize = 1u << 20;  // type byte + body

// The largest colcrypt.key_cache_ttl (seconds): how long a backend may keep
// encrypting under a primary version it fetched. colcrypt-keyd's default
// --retire-grace-seconds is this value, so that a retired version is never
// disabled or destroyed while a backend may still encrypt under it
// (docs/rotation.md).
constexpr int kMaxKeyCacheTtlSeconds = 86400;

enum class MsgType : uint8_t {
  // requests
  FetchPrimary = 0x01,  // body: str name            -> Key (the primary version)
  FetchVersion = 0x02,  // body: id[16], u32 version  -> Key
  // body: str name, u32 uses wanted -> KeyGrant (the primary version and a
  // block of encryptions charged to it; docs/protocol.md, issue 3). wanted 0
  // is a lookup that will not encrypt: the key, granted 0, nothing charged.
  FetchPrimaryBlock = 0x03,
  // body: id[16], u32 version, u8 FetchPurpose -> Key. FetchVersion for a
  // derivation: the backend will key deterministic values (AES-SIV) or blind
  // indexes from this version, and keyd records that the version is pinned
  // (docs/protocol.md, docs/rotation.md). Plain decryption uses FetchVersion.
  FetchVersionFor = 0x04,
  // body: str name, u8 FetchPurpose (File only) -> Key: FetchPrimary (one
  // encryption charged) for a use keyd audits apart from column values.
  // colcrypt-file wraps each file's data key with the primary version.
  FetchPrimaryFor = 0x05,
  Admin = 0x10,  // body: JSON request         -> AdminResult
  // body: str key name, str privilege, str role, str database -> Ack. The
  // extension reports a use of a key that it denied to a role, for keyd's log.
  DenialReport = 0x30,
  // replies
  Key = 0x81,          // body: id[16], u32 version, u8 state, str name, key[32]
  KeyGrant = 0x82,     // body: as Key, then u32 uses granted (0 only when 0 were wanted)
  AdminResult = 0x90,  // body: JSON
  Ack = 0xB0,          // body: empty
  Failure = 0xFF,      // body: u16 FailureCode, str message (generic, no secrets)
};

enum class FailureCode : uint16_t {
  NotFound = 1,
  Denied = 2,
  BadRequest = 3,
  Internal = 4,
  KeyUnavailable = 5,  // version exists but is disabled / destroyed
  AlreadyExists = 6,
  // keyd cannot serve keys now (its audit log cannot be written and it runs
  // with --audit-failure refuse); retrying later may succeed.
  Unavailable = 7,
};

// Why a client fetches a version with FetchVersionFor (or the primary with
// FetchPrimaryFor).
enum class FetchPurpose : uint8_t {
  Decrypt = 0,        // never sent (that is FetchVersion / FetchPrimary)
  Deterministic = 1,  // AES-SIV values: colcrypt.encrypt_deterministic and its decryption
  BlindIndex = 2,     // colcrypt.blind_index
  File = 3,           // colcrypt-file: a file's data key (docs/format.md); pins nothing
};
// "decrypt", "deterministic", "blind_index", "file"
const char* fetch_purpose_name(FetchPurpose p);

enum class KeyState : uint8_t { Active = 1, DecryptOnly = 2, Disabled = 3, Destroyed = 4 };
const char* key_state_name(KeyState s);

struct KeyReply {
  KeyId id{};
  uint32_t version = 0;
  KeyState state = KeyState::Active;
  std::string name;
  SecretBytes key;  // 32 bytes
};

// A use of a key that the extension refused to a database role.
struct DenialReport {
  std::string key_name;
  std::string privilege;  // "encrypt", "decrypt", "blind_index"
  std::string role;
  std::string database;
};

struct KeyGrantReply {
  KeyReply key;
  uint32_t granted = 0;  // encryptions this reply allows with key.version
};

struct FailureReply {
  FailureCode code = FailureCode::Internal;
  std::string message;
};

// A whole frame (length prefix included), ready to write.
std::vector<uint8_t> encode_frame(MsgType type, ByteView body);
// Frames carrying key bytes are built in secret memory.
SecretBytes encode_key_reply(const KeyReply& reply);
SecretBytes encode_key_grant(const KeyReply& reply, uint32_t granted);

// purpose Decrypt: a FetchPrimary frame; File: a FetchPrimaryFor frame.
std::vector<uint8_t> encode_fetch_primary(std::string_view name,
                                          FetchPurpose purpose = FetchPurpose::Decrypt);
std::vector<uint8_t> encode_fetch_primary_block(std::string_view name, uint32_t wanted);
// purpose Decrypt: a FetchVersion frame (understood by every keyd); any other
// purpose: a FetchVersionFor frame.
std::vector<uint8_t> encode_fetch_version(const KeyId& id, uint32_t version,
                                          FetchPurpose purpose = FetchPurpose::Decrypt);
std::vector<uint8_t> encode_admin(std::string_view json);
std::vector<uint8_t> encode_admin_result(std::string_view json);
std::vector<uint8_t> encode_failure(FailureCode code, std::string_view message);
std::vector<uint8_t> encode_denial_report(const DenialReport& report);
std::vector<uint8_t> encode_ack();

// Body decoders; each throws Errc::ProtocolError on short, long or invalid bodies.
std::string decode_fetch_primary(ByteView body);
void decode_fetch_version(ByteView body, KeyId& id, uint32_t& version);
// A FetchVersionFor body; a purpose other than Deterministic, BlindIndex or
// File is a ProtocolError.
void decode_fetch_version_for(ByteView body, KeyId& id, uint32_t& version, FetchPurpose& purpose);
// A FetchPrimaryFor body; a purpose other than File is a ProtocolError.
std::string decode_fetch_primary_for(ByteView body, FetchPurpose& purpose);
std::string decode_fetch_primary_block(ByteView body, uint32_t& wanted);  // wanted 0: a lookup
KeyReply decode_key_reply(ByteView body);
KeyGrantReply decode_key_grant(ByteView body);
FailureReply decode_failure(ByteView body);
DenialReport decode_denial_report(ByteView body);

struct Frame {
  MsgType type;
  std::vector<uint8_t> body;  // wiped on destruction by the owner if it held secrets
};

// Accumulates bytes read from a stream and cuts them into frames. A frame
// whose length is 0 or above kMaxFrameSize throws Errc::ProtocolError (the
// connection must then be dropped). Unknown message types are returned as-is;
// the receiver decides. The internal buffer is wiped as it is consumed.
class FrameReader {
 public:
  ~FrameReader();
  void feed(const uint8_t* data, size_t n);
  std::optional<Frame> next();
  size_t buffered() const { return buffer_.size(); }

 private:
  std::vector<uint8_t> buffer_;
};

}  // namespace colcrypt::wire
