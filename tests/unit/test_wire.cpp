#include <catch2/catch.hpp>
#include <cstring>
#include <string>

#include "core/wire.hpp"
#include "support.hpp"

using namespace colcrypt;
using namespace colcrypt::wire;
using colcrypt::test::hex;

namespace {

const KeyId kId = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};

std::vector<uint8_t> to_vector(const SecretBytes& s) {
  return std::vector<uint8_t>(s.data(), s.data() + s.size());
}

// Cuts one whole encoded frame with a FrameReader.
Frame only_frame(const std::vector<uint8_t>& encoded) {
  FrameReader reader;
  reader.feed(encoded.data(), encoded.size());
  auto frame = reader.next();
  REQUIRE(frame.has_value());
  REQUIRE(reader.buffered() == 0);
  REQUIRE_FALSE(reader.next().has_value());
  return std::move(*frame);
}

KeyReply sample_key_reply() {
  KeyReply r;
  r.id = kId;
  r.version = 0x01020304;
  r.state = KeyState::DecryptOnly;
  r.name = "customer_ssn";
  std::vector<uint8_t> key(32);
  for (size_t i = 0; i < key.size(); ++i) key[i] = static_cast<uint8_t>(0xA0 + i);
  r.key = SecretBytes(key);
  return r;
}

// Every strict prefix of the body and the body plus one byte must be refused.
template <class Decode>
void require_exact_body(const std::vector<uint8_t>& body, Decode decode) {
  for (size_t len = 0; len < body.size(); ++len) {
    INFO("truncated to " << len);
    REQUIRE_ERRC(decode(ByteView(body.data(), len)), Errc::ProtocolError);
  }
  auto longer = body;
  longer.push_back(0);
  REQUIRE_ERRC(decode(ByteView(longer)), Errc::ProtocolError);
}

}  // namespace

TEST_CASE("fetch primary encodes byte for byte", "[wire]") {
  const auto frame = encode_fetch_primary("k1");
  REQUIRE(hex(frame) ==
          "00000005"
          "01"
          "0002"
          "6b31");
  const Frame f = only_frame(frame);
  REQUIRE(f.type == MsgType::FetchPrimary);
  REQUIRE(decode_fetch_primary(f.body) == "k1");
  require_exact_body(f.body, [](ByteView b) { return decode_fetch_primary(b); });
  REQUIRE(decode_fetch_primary(only_frame(encode_fetch_primary("")).body).empty());
  REQUIRE_ERRC(encode_fetch_primary(std::string(65536, 'a')), Errc::InvalidArgument);
  REQUIRE(
      decode_fetch_primary(only_frame(encode_fetch_primary(std::string(65535, 'a'))).body).size() ==
      65535);
}

TEST_CASE("fetch version encodes byte for byte", "[wire]") {
  const auto frame = encode_fetch_version(kId, 7);
  REQUIRE(hex(frame) ==
          "00000015"
          "02"
          "0102030405060708090a0b0c0d0e0f10"
          "00000007");
  const Frame f = only_frame(frame);
  REQUIRE(f.type == MsgType::FetchVersion);
  KeyId id{};
  uint32_t version = 0;
  decode_fetch_version(f.body, id, version);
  REQUIRE(id == kId);
  REQUIRE(version == 7);
  require_exact_body(f.body, [](ByteView b) {
    KeyId i{};
    uint32_t v = 0;
    decode_fetch_version(b, i, v);
    return v;
  });
}

TEST_CASE("fetch version for a derivation encodes byte for byte", "[wire]") {
  // Plain decryption stays a FetchVersion frame (what every keyd understands).
  REQUIRE(encode_fetch_version(kId, 7, FetchPurpose::Decrypt) == encode_fetch_version(kId, 7));
  const auto frame = encode_fetch_version(kId, 1, FetchPurpose::BlindIndex);
  REQUIRE(hex(frame) ==
          "00000016"
          "04"
          "0102030405060708090a0b0c0d0e0f10"
          "00000001"
          "02");
  const Frame f = only_frame(frame);
  REQUIRE(f.type == MsgType::FetchVersionFor);
  KeyId id{};
  uint32_t version = 0;
  FetchPurpose purpose = FetchPurpose::Decrypt;
  decode_fetch_version_for(f.body, id, version, purpose);
  REQUIRE(id == kId);
  REQUIRE(version == 1);
  REQUIRE(purpose == FetchPurpose::BlindIndex);
  const auto det = only_frame(encode_fetch_version(kId, 1, FetchPurpose::Deterministic));
  decode_fetch_version_for(det.body, id, version, purpose);
  REQUIRE(purpose == FetchPurpose::Deterministic);
  REQUIRE(std::string(fetch_purpose_name(purpose)) == "deterministic");
  require_exact_body(f.body, [](ByteView b) {
    KeyId i{};
    uint32_t v = 0;
    FetchPurpose p{};
    decode_fetch_version_for(b, i, v, p);
    return v;
  });
  // A purpose this side does not know (or Decrypt, which has its own frame) is refused.
  for (uint8_t bad : {0, 4, 0xff}) {
    std::vector<uint8_t> body(f.body.begin(), f.body.end());
    body.back() = bad;
    REQUIRE_THROWS_AS(decode_fetch_version_for(ByteView(body), id, version, purpose), Error);
  }
  // colcrypt-file's fetches (purpose 3).
  const auto file = only_frame(encode_fetch_version(kId, 2, FetchPurpose::File));
  decode_fetch_version_for(file.body, id, version, purpose);
  REQUIRE(purpose == FetchPurpose::File);
  REQUIRE(std::string(fetch_purpose_name(purpose)) == "file");
}

TEST_CASE("fetch primary for a file encodes byte for byte", "[wire]") {
  REQUIRE(encode_fetch_primary("k1", FetchPurpose::Decrypt) == encode_fetch_primary("k1"));
  const auto frame = encode_fetch_primary("k1", FetchPurpose::File);
  REQUIRE(hex(frame) ==
          "00000006"
          "05"
          "00026b31"
          "03");
  const Frame f = only_frame(frame);
  REQUIRE(f.type == MsgType::FetchPrimaryFor);
  FetchPurpose purpose = FetchPurpose::Decrypt;
  REQUIRE(decode_fetch_primary_for(f.body, purpose) == "k1");
  REQUIRE(purpose == FetchPurpose::File);
  require_exact_body(f.body, [](ByteView b) {
    FetchPurpose p{};
    return decode_fetch_primary_for(b, p);
  });
  // Only the file purpose has a primary fetch of its own.
  for (uint8_t bad : {0, 1, 2, 4}) {
    std::vector<uint8_t> body(f.body.begin(), f.body.end());
    body.back() = bad;
    REQUIRE_THROWS_AS(decode_fetch_primary_for(ByteView(body), purpose), Error);
  }
}

TEST_CASE("key reply encodes byte for byte in secret memory", "[wire]") {
  const KeyReply reply = sample_key_reply();
  const SecretBytes frame = encode_key_reply(reply);
  std::string expected =
      "00000044"
      "81"
      "0102030405060708090a0b0c0d0e0f10"
      "01020304"
      "02"
      "000c" +
      hex(ByteView::of("customer_ssn").data, 12);
  for (int i = 0; i < 32; ++i)
    expected += hex(std::vector<uint8_t>{static_cast<uint8_t>(0xA0 + i)});
  REQUIRE(hex(frame.data(), frame.size()) == expected);

  const Frame f = only_frame(to_vector(frame));
  REQUIRE(f.type == MsgType::Key);
  const KeyReply back = decode_key_reply(f.body);
  REQUIRE(back.id == reply.id);
  REQUIRE(back.version == reply.version);
  REQUIRE(back.state == reply.state);
  REQUIRE(back.name == reply.name);
  REQUIRE(constant_time_equal(back.key.view(), reply.key.view()));
  require_exact_body(f.body, [](ByteView b) { return decode_key_reply(b); });

  SECTION("invalid states are refused") {
    for (uint8_t state : {0, 5, 0xFF}) {
      auto body = f.body;
      body[20] = state;
      REQUIRE_ERRC(decode_key_reply(body), Errc::ProtocolError);
    }
  }
  SECTION("only 32-byte keys are sent") {
    KeyReply bad = sample_key_reply();
    bad.key = SecretBytes(31);
    REQUIRE_ERRC(encode_key_reply(bad), Errc::InvalidArgument);
    bad.key = SecretBytes();
    REQUIRE_ERRC(encode_key_reply(bad), Errc::InvalidArgument);
  }
}

TEST_CASE("admin and failure messages", "[wire]") {
  // The examples of docs/protocol.md.
  REQUIRE(hex(encode_admin(R"({"op":"list"})")) ==
          "0000000e10"
          "7b226f70223a226c697374227d");
  REQUIRE(hex(encode_admin_result(R"({"keys":[]})")) ==
          "0000000c90"
          "7b226b657973223a5b5d7d");
  REQUIRE(hex(encode_failure(FailureCode::NotFound, "key 'x' not found")) ==
          "00000016ff00010011"
          "6b657920277827206e6f7420666f756e64");

  const std::string json = R"({"op":"list"})";
  const Frame req = only_frame(encode_admin(json));
  REQUIRE(req.type == MsgType::Admin);
  REQUIRE(std::string(req.body.begin(), req.body.end()) == json);
  const Frame res = only_frame(encode_admin_result(R"({"keys":[]})"));
  REQUIRE(res.type == MsgType::AdminResult);
  REQUIRE(std::string(res.body.begin(), res.body.end()) == R"({"keys":[]})");

  const auto failure = encode_failure(FailureCode::NotFound, "key 'x' not found");
  REQUIRE(hex(failure).substr(0, 18) ==
          "00000016"
          "ff"
          "0001"
          "0011");
  const Frame f = only_frame(failure);
  REQUIRE(f.type == MsgType::Failure);
  const FailureReply reply = decode_failure(f.body);
  REQUIRE(reply.code == FailureCode::NotFound);
  REQUIRE(reply.message == "key 'x' not found");
  require_exact_body(f.body, [](ByteView b) { return decode_failure(b); });
  for (FailureCode code :
       {FailureCode::NotFound, FailureCode::Denied, FailureCode::BadRequest, FailureCode::Internal,
        FailureCode::KeyUnavailable, FailureCode::AlreadyExists}) {
    REQUIRE(decode_failure(only_frame(encode_failure(code, "")).body).code == code);
  }
}

TEST_CASE("frame size limits on the sending side", "[wire]") {
  const std::vector<uint8_t> max_body(kMaxFrameSize - 1, 'x');
  const auto frame = encode_frame(MsgType::AdminResult, max_body);
  REQUIRE(frame.size() == 4 + kMaxFrameSize);
  REQUIRE(only_frame(frame).body.size() == kMaxFrameSize - 1);
  const std::vector<uint8_t> too_big(kMaxFrameSize, 'x');
  REQUIRE_ERRC(encode_frame(MsgType::AdminResult, too_big), Errc::InvalidArgument);
  REQUIRE_ERRC(encode_admin(std::string(kMaxFrameSize, ' ')), Errc::InvalidArgument);
  REQUIRE(encode_frame(MsgType::Admin, ByteView()).size() == 5);
}

TEST_CASE("FrameReader cuts a stream fed one byte at a time", "[wire]") {
  std::vector<uint8_t> stream;
  const auto a = encode_fetch_primary("alpha");
  const auto b = encode_admin("{}");
  const auto c = to_vector(encode_key_reply(sample_key_reply()));
  const auto d = encode_frame(static_cast<MsgType>(0x42), ByteView());  // unknown type
  for (const auto* part : {&a, &b, &c, &d}) stream.insert(stream.end(), part->begin(), part->end());

  FrameReader reader;
  std::vector<Frame> frames;
  for (size_t i = 0; i < stream.size(); ++i) {
    reader.feed(&stream[i], 1);
    while (auto frame = reader.next()) frames.push_back(std::move(*frame));
    // A frame is only produced once its last byte has arrived.
    const size_t ends[] = {a.size(), a.size() + b.size(), a.size() + b.size() + c.size(),
                           stream.size()};
    size_t complete = 0;
    for (size_t end : ends) complete += (i + 1 >= end) ? 1 : 0;
    REQUIRE(frames.size() == complete);
  }
  REQUIRE(reader.buffered() == 0);
  REQUIRE(frames.size() == 4);
  REQUIRE(frames[0].type == MsgType::FetchPrimary);
  REQUIRE(decode_fetch_primary(frames[0].body) == "alpha");
  REQUIRE(frames[1].type == MsgType::Admin);
  REQUIRE(frames[2].type == MsgType::Key);
  REQUIRE(decode_key_reply(frames[2].body).name == "customer_ssn");
  REQUIRE(static_cast<uint8_t>(frames[3].type) == 0x42);
  REQUIRE(frames[3].body.empty());

  // The same stream in one piece.
  FrameReader whole;
  whole.feed(stream.data(), stream.size());
  int count = 0;
  while (whole.next()) ++count;
  REQUIRE(count == 4);
}

TEST_CASE("FrameReader refuses zero and oversized lengths", "[wire]") {
  SECTION("zero") {
    FrameReader reader;
    const uint8_t zero[] = {0, 0, 0, 0, 1};
    reader.feed(zero, sizeof zero);
    REQUIRE_ERRC(reader.next(), Errc::ProtocolError);
  }
  SECTION("one above the cap, detected from the length alone") {
    FrameReader reader;
    const uint32_t len = kMaxFrameSize + 1;
    const uint8_t header[] = {uint8_t(len >> 24), uint8_t(len >> 16), uint8_t(len >> 8),
                              uint8_t(len)};
    reader.feed(header, 3);
    REQUIRE_FALSE(reader.next().has_value());
    reader.feed(header + 3, 1);
    REQUIRE_ERRC(reader.next(), Errc::ProtocolError);
  }
  SECTION("huge") {
    FrameReader reader;
    const uint8_t header[] = {0xFF, 0xFF, 0xFF, 0xFF, 0x01};
    reader.feed(header, sizeof header);
    REQUIRE_ERRC(reader.next(), Errc::ProtocolError);
  }
  SECTION("exactly the cap is accepted") {
    const std::vector<uint8_t> body(kMaxFrameSize - 1, 7);
    REQUIRE(only_frame(encode_frame(MsgType::AdminResult, body)).body == body);
  }
}

TEST_CASE("FrameReader waits for truncated frames", "[wire]") {
  const auto frame = encode_failure(FailureCode::Denied, "denied");
  for (size_t len = 0; len < frame.size(); ++len) {
    FrameReader reader;
    reader.feed(frame.data(), len);
    REQUIRE_FALSE(reader.next().has_value());
    REQUIRE(reader.buffered() == len);
  }
}

TEST_CASE("key state names", "[wire]") {
  REQUIRE(std::string(key_state_name(KeyState::Active)) == "active");
  REQUIRE(std::string(key_state_name(KeyState::DecryptOnly)) == "decrypt-only");
  REQUIRE(std::string(key_state_name(KeyState::Disabled)) == "disabled");
  REQUIRE(std::string(key_state_name(KeyState::Destroyed)) == "destroyed");
}
