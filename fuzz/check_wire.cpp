#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "checks.hpp"
#include "core/error.hpp"
#include "core/wire.hpp"

namespace colcrypt::fuzz {

namespace {

using wire::MsgType;

template <class Bytes>
bool same(const Bytes& encoded, const std::vector<uint8_t>& frame) {
  return encoded.size() == frame.size() && std::equal(frame.begin(), frame.end(), encoded.data());
}

// A frame's body decodes (or fails as a ProtocolError) and what decodes
// encodes to the same frame.
bool check_frame(const wire::Frame& f) {
  const std::vector<uint8_t> frame = wire::encode_frame(f.type, ByteView(f.body));
  const ByteView body(f.body);
  try {
    switch (f.type) {
      case MsgType::FetchPrimary:
        return same(wire::encode_fetch_primary(wire::decode_fetch_primary(body)), frame);
      case MsgType::FetchPrimaryFor: {
        wire::FetchPurpose purpose{};
        const std::string name = wire::decode_fetch_primary_for(body, purpose);
        return same(wire::encode_fetch_primary(name, purpose), frame);
      }
      case MsgType::FetchVersion: {
        KeyId id{};
        uint32_t version = 0;
        wire::decode_fetch_version(body, id, version);
        return same(wire::encode_fetch_version(id, version), frame);
      }
      case MsgType::FetchVersionFor: {
        KeyId id{};
        uint32_t version = 0;
        wire::FetchPurpose purpose{};
        wire::decode_fetch_version_for(body, id, version, purpose);
        return same(wire::encode_fetch_version(id, version, purpose), frame);
      }
      case MsgType::FetchPrimaryBlock: {
        uint32_t wanted = 0;
        const std::string name = wire::decode_fetch_primary_block(body, wanted);
        return same(wire::encode_fetch_primary_block(name, wanted), frame);
      }
      case MsgType::Admin:
        return same(wire::encode_admin(std::string(f.body.begin(), f.body.end())), frame);
      case MsgType::AdminResult:
        return same(wire::encode_admin_result(std::string(f.body.begin(), f.body.end())), frame);
      case MsgType::DenialReport:
        return same(wire::encode_denial_report(wire::decode_denial_report(body)), frame);
      case MsgType::Key: {
        const wire::KeyReply reply = wire::decode_key_reply(body);
        if (reply.key.size() != AeadKey::kKeySize) return false;
        return same(wire::encode_key_reply(reply), frame);
      }
      case MsgType::KeyGrant: {
        const wire::KeyGrantReply grant = wire::decode_key_grant(body);
        return same(wire::encode_key_grant(grant.key, grant.granted), frame);
      }
      case MsgType::Failure: {
        const wire::FailureReply failure = wire::decode_failure(body);
        return same(wire::encode_failure(failure.code, failure.message), frame);
      }
      case MsgType::Ack:
        return !f.body.empty() || same(wire::encode_ack(), frame);
    }
    return true;  // a type keyd does not know: the receiver answers Failure
  } catch (const Error& e) {
    return e.code() == Errc::ProtocolError;
  }
}

// Every frame next() returns until it throws (a ProtocolError: the
// connection would be dropped) or wants more bytes.
bool drain(wire::FrameReader& reader, std::vector<wire::Frame>& frames, bool& dropped) {
  try {
    while (auto f = reader.next()) frames.push_back(std::move(*f));
  } catch (const Error& e) {
    dropped = true;
    return e.code() == Errc::ProtocolError;
  }
  return true;
}

}  // namespace

bool check_wire(const uint8_t* data, size_t size) {
  if (size == 0) return true;
  // The first byte: how many bytes each read() returns in the second pass.
  const size_t chunk = data[0] + 1u;
  ++data;
  --size;

  wire::FrameReader whole;
  std::vector<wire::Frame> frames;
  bool dropped = false;
  whole.feed(data, size);
  if (!drain(whole, frames, dropped)) return false;

  wire::FrameReader pieces;
  std::vector<wire::Frame> frames_in_pieces;
  bool dropped_in_pieces = false;
  for (size_t off = 0; off < size && !dropped_in_pieces; off += chunk) {
    pieces.feed(data + off, std::min(chunk, size - off));
    if (!drain(pieces, frames_in_pieces, dropped_in_pieces)) return false;
  }
  if (dropped != dropped_in_pieces || frames.size() != frames_in_pieces.size()) return false;

  // The frames re-encode to the bytes they were cut from, in order.
  size_t offset = 0;
  for (size_t i = 0; i < frames.size(); ++i) {
    if (frames[i].type != frames_in_pieces[i].type || frames[i].body != frames_in_pieces[i].body)
      return false;
    const std::vector<uint8_t> encoded =
        wire::encode_frame(frames[i].type, ByteView(frames[i].body));
    if (encoded.size() > size - offset ||
        std::memcmp(encoded.data(), data + offset, encoded.size()) != 0)
      return false;
    offset += encoded.size();
    if (!check_frame(frames[i])) return false;
  }
  return dropped || whole.buffered() == size - offset;
}

}  // namespace colcrypt::fuzz
