#include "core/wire.hpp"

#include <algorithm>
#include <cstring>

#include "core/error.hpp"

namespace colcrypt::wire {

namespace {

constexpr size_t kLengthSize = 4;
constexpr size_t kMaxString = 0xFFFF;

[[noreturn]] void protocol_error(const char* why) { throw Error(Errc::ProtocolError, why); }

// Writes big-endian integers and u16-length strings into a buffer whose size
// was computed up front (so secret frames never reallocate).
class Writer {
 public:
  explicit Writer(uint8_t* p) : p_(p) {}
  void u8(uint8_t v) { *p_++ = v; }
  void u16(uint16_t v) {
    u8(static_cast<uint8_t>(v >> 8));
    u8(static_cast<uint8_t>(v));
  }
  void u32(uint32_t v) {
    u16(static_cast<uint16_t>(v >> 16));
    u16(static_cast<uint16_t>(v));
  }
  void bytes(const uint8_t* d, size_t n) {
    if (n > 0) std::memcpy(p_, d, n);
    p_ += n;
  }
  void str(std::string_view s) {
    u16(static_cast<uint16_t>(s.size()));
    bytes(reinterpret_cast<const uint8_t*>(s.data()), s.size());
  }
  uint8_t* position() const { return p_; }

 private:
  uint8_t* p_;
};

// Reads a body; every short read or leftover byte is a ProtocolError.
class Reader {
 public:
  explicit Reader(ByteView body) : p_(body.data), left_(body.size) {}
  const uint8_t* take(size_t n) {
    if (left_ < n) protocol_error("message body too short");
    const uint8_t* p = p_;
    p_ += n;
    left_ -= n;
    return p;
  }
  uint8_t u8() { return *take(1); }
  uint16_t u16() {
    const uint8_t* p = take(2);
    return static_cast<uint16_t>(p[0] << 8 | p[1]);
  }
  uint32_t u32() {
    const uint8_t* p = take(4);
    return uint32_t{p[0]} << 24 | uint32_t{p[1]} << 16 | uint32_t{p[2]} << 8 | uint32_t{p[3]};
  }
  std::string str() {
    const size_t n = u16();
    const uint8_t* p = take(n);
    return std::string(reinterpret_cast<const char*>(p), n);
  }
  void finish() const {
    if (left_ != 0) protocol_error("trailing bytes after message body");
  }

 private:
  const uint8_t* p_;
  size_t left_;
};

size_t string_size(std::string_view s, const char* what) {
  if (s.size() > kMaxString) throw Error(Errc::InvalidArgument, std::string(what) + " too long");
  return 2 + s.size();
}

size_t checked_frame_size(size_t body_size) {
  if (body_size > kMaxFrameSize - 1) throw Error(Errc::InvalidArgument, "message too large");
  return kLengthSize + 1 + body_size;
}

// Writes the length prefix and type; returns a writer positioned at the body.
Writer start_frame(uint8_t* frame, MsgType type, size_t body_size) {
  Writer w(frame);
  w.u32(static_cast<uint32_t>(1 + body_size));
  w.u8(static_cast<uint8_t>(type));
  return w;
}

}  // namespace

const char* key_state_name(KeyState s) {
  switch (s) {
    case KeyState::Active:
      return "active";
    case KeyState::DecryptOnly:
      return "decrypt-only";
    case KeyState::Disabled:
      return "disabled";
    case KeyState::Destroyed:
      return "destroyed";
  }
  return "unknown";
}

std::vector<uint8_t> encode_frame(MsgType type, ByteView body) {
  std::vector<uint8_t> frame(checked_frame_size(body.size));
  start_frame(frame.data(), type, body.size).bytes(body.data, body.size);
  return frame;
}

namespace {

SecretBytes encode_key_body(MsgType type, const KeyReply& reply, const uint32_t* granted) {
  if (reply.key.size() != AeadKey::kKeySize) {
    throw Error(Errc::InvalidArgument, "key reply must carry a 32-byte key");
  }
  const size_t body = kKeyIdSize + 4 + 1 + string_size(reply.name, "key name") + reply.key.size() +
                      (granted != nullptr ? 4 : 0);
  SecretBytes frame(checked_frame_size(body));
  Writer w = start_frame(frame.data(), type, body);
  w.bytes(reply.id.data(), reply.id.size());
  w.u32(reply.version);
  w.u8(static_cast<uint8_t>(reply.state));
  w.str(reply.name);
  w.bytes(reply.key.data(), reply.key.size());
  if (granted != nullptr) w.u32(*granted);
  return frame;
}

KeyReply read_key_body(Reader& r) {
  KeyReply reply;
  std::memcpy(reply.id.data(), r.take(kKeyIdSize), kKeyIdSize);
  reply.version = r.u32();
  const uint8_t state = r.u8();
  if (state < static_cast<uint8_t>(KeyState::Active) ||
      state > static_cast<uint8_t>(KeyState::Destroyed)) {
    protocol_error("invalid key state");
  }
  reply.state = static_cast<KeyState>(state);
  reply.name = r.str();
  reply.key = SecretBytes(r.take(AeadKey::kKeySize), AeadKey::kKeySize);
  return reply;
}

}  // namespace

SecretBytes encode_key_reply(const KeyReply& reply) {
  return encode_key_body(MsgType::Key, reply, nullptr);
}

SecretBytes encode_key_grant(const KeyReply& reply, uint32_t granted) {
  return encode_key_body(MsgType::KeyGrant, reply, &granted);
}

std::vector<uint8_t> encode_fetch_primary_block(std::string_view name, uint32_t wanted) {
  const size_t body = string_size(name, "key name") + 4;
  std::vector<uint8_t> frame(checked_frame_size(body));
  Writer w = start_frame(frame.data(), MsgType::FetchPrimaryBlock, body);
  w.str(name);
  w.u32(wanted);
  return frame;
}

std::vector<uint8_t> encode_fetch_primary(std::string_view name, FetchPurpose purpose) {
  const bool plain = purpose == FetchPurpose::Decrypt;
  const size_t body = string_size(name, "key name") + (plain ? 0 : 1);
  std::vector<uint8_t> frame(checked_frame_size(body));
  Writer w =
      start_frame(frame.data(), plain ? MsgType::FetchPrimary : MsgType::FetchPrimaryFor, body);
  w.str(name);
  if (!plain) w.u8(static_cast<uint8_t>(purpose));
  return frame;
}

std::vector<uint8_t> encode_fetch_version(const KeyId& id, uint32_t version, FetchPurpose purpose) {
  const bool plain = purpose == FetchPurpose::Decrypt;
  const size_t body = kKeyIdSize + 4 + (plain ? 0 : 1);
  std::vector<uint8_t> frame(checked_frame_size(body));
  Writer w =
      start_frame(frame.data(), plain ? MsgType::FetchVersion : MsgType::FetchVersionFor, body);
  w.bytes(id.data(), id.size());
  w.u32(version);
  if (!plain) w.u8(static_cast<uint8_t>(purpose));
  return frame;
}

std::vector<uint8_t> encode_admin(std::string_view json) {
  return encode_frame(MsgType::Admin, ByteView::of(json));
}

std::vector<uint8_t> encode_admin_result(std::string_view json) {
  return encode_frame(MsgType::AdminResult, ByteView::of(json));
}

std::vector<uint8_t> encode_failure(FailureCode code, std::string_view message) {
  const size_t body = 2 + string_size(message, "failure message");
  std::vector<uint8_t> frame(checked_frame_size(body));
  Writer w = start_frame(frame.data(), MsgType::Failure, body);
  w.u16(static_cast<uint16_t>(code));
  w.str(message);
  return frame;
}

std::vector<uint8_t> encode_denial_report(const DenialReport& report) {
  const size_t body = string_size(report.key_name, "key name") +
                      string_size(report.privilege, "privilege") +
                      string_size(report.role, "role") + string_size(report.database, "database");
  std::vector<uint8_t> frame(checked_frame_size(body));
  Writer w = start_frame(frame.data(), MsgType::DenialReport, body);
  w.str(report.key_name);
  w.str(report.privilege);
  w.str(report.role);
  w.str(report.database);
  return frame;
}

std::vector<uint8_t> encode_ack() { return encode_frame(MsgType::Ack, ByteView()); }

DenialReport decode_denial_report(ByteView body) {
  Reader r(body);
  DenialReport report;
  report.key_name = r.str();
  report.privilege = r.str();
  report.role = r.str();
  report.database = r.str();
  r.finish();
  return report;
}

std::string decode_fetch_primary(ByteView body) {
  Reader r(body);
  std::string name = r.str();
  r.finish();
  return name;
}

void decode_fetch_version(ByteView body, KeyId& id, uint32_t& version) {
  Reader r(body);
  std::memcpy(id.data(), r.take(kKeyIdSize), kKeyIdSize);
  version = r.u32();
  r.finish();
}

void decode_fetch_version_for(ByteView body, KeyId& id, uint32_t& version, FetchPurpose& purpose) {
  Reader r(body);
  std::memcpy(id.data(), r.take(kKeyIdSize), kKeyIdSize);
  version = r.u32();
  const uint8_t p = r.u8();
  r.finish();
  if (p != static_cast<uint8_t>(FetchPurpose::Deterministic) &&
      p != static_cast<uint8_t>(FetchPurpose::BlindIndex) &&
      p != static_cast<uint8_t>(FetchPurpose::File)) {
    protocol_error("unknown fetch purpose");
  }
  purpose = static_cast<FetchPurpose>(p);
}

std::string decode_fetch_primary_for(ByteView body, FetchPurpose& purpose) {
  Reader r(body);
  std::string name = r.str();
  const uint8_t p = r.u8();
  r.finish();
  if (p != static_cast<uint8_t>(FetchPurpose::File)) protocol_error("unknown fetch purpose");
  purpose = static_cast<FetchPurpose>(p);
  return name;
}

const char* fetch_purpose_name(FetchPurpose p) {
  switch (p) {
    case FetchPurpose::Deterministic:
      return "deterministic";
    case FetchPurpose::BlindIndex:
      return "blind_index";
    case FetchPurpose::File:
      return "file";
    default:
      return "decrypt";
  }
}

KeyReply decode_key_reply(ByteView body) {
  Reader r(body);
  KeyReply reply = read_key_body(r);
  r.finish();
  return reply;
}

KeyGrantReply decode_key_grant(ByteView body) {
  Reader r(body);
  KeyGrantReply reply;
  reply.key = read_key_body(r);
  reply.granted = r.u32();
  r.finish();
  return reply;
}

std::string decode_fetch_primary_block(ByteView body, uint32_t& wanted) {
  Reader r(body);
  std::string name = r.str();
  wanted = r.u32();
  r.finish();
  return name;
}

FailureReply decode_failure(ByteView body) {
  Reader r(body);
  FailureReply reply;
  // Codes this build does not know are passed through; callers treat them as Internal.
  reply.code = static_cast<FailureCode>(r.u16());
  reply.message = r.str();
  r.finish();
  return reply;
}

FrameReader::~FrameReader() { secure_zero(buffer_.data(), buffer_.size()); }

void FrameReader::feed(const uint8_t* data, size_t n) {
  if (n == 0) return;
  if (buffer_.size() + n > buffer_.capacity()) {
    // Grow by hand: a vector reallocation would free the old storage unwiped.
    std::vector<uint8_t> grown;
    grown.reserve(std::max(buffer_.size() + n, buffer_.capacity() * 2));
    grown.assign(buffer_.begin(), buffer_.end());
    secure_zero(buffer_.data(), buffer_.size());
    buffer_.swap(grown);
  }
  buffer_.insert(buffer_.end(), data, data + n);
}

std::optional<Frame> FrameReader::next() {
  if (buffer_.size() < kLengthSize) return std::nullopt;
  const uint8_t* p = buffer_.data();
  const uint32_t length =
      uint32_t{p[0]} << 24 | uint32_t{p[1]} << 16 | uint32_t{p[2]} << 8 | uint32_t{p[3]};
  if (length == 0) protocol_error("frame length 0");
  if (length > kMaxFrameSize) protocol_error("frame length above the limit");
  if (buffer_.size() - kLengthSize < length) return std::nullopt;

  Frame frame{static_cast<MsgType>(p[kLengthSize]),
              std::vector<uint8_t>(p + kLengthSize + 1, p + kLengthSize + length)};
  const size_t consumed = kLengthSize + length;
  const size_t rest = buffer_.size() - consumed;
  if (rest > 0) std::memmove(buffer_.data(), buffer_.data() + consumed, rest);
  secure_zero(buffer_.data() + rest, consumed);
  buffer_.resize(rest);
  return frame;
}

}  // namespace colcrypt::wire
