#include <catch2/catch.hpp>
#include <cstring>
#include <set>
#include <string>

#include "core/envelope.hpp"
#include "core/secure_memory.hpp"
#include "support.hpp"

using namespace colcrypt;
using colcrypt::test::hex;
using colcrypt::test::unhex;

namespace {

std::vector<uint8_t> sequence(size_t n, uint8_t start = 0) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(start + i);
  return v;
}

const KeyId kKeyId = {0x0f, 0x1e, 0x2d, 0x3c, 0x4b, 0x5a, 0x49, 0x78,
                      0x87, 0x96, 0xa5, 0xb4, 0xc3, 0xd2, 0xe1, 0xf0};

struct Fixture {
  std::vector<uint8_t> key_bytes = sequence(32);
  AeadKey key{key_bytes};

  std::vector<uint8_t> seal_value(ByteView plaintext, ByteView context,
                                  PayloadType payload = PayloadType::Bytes, uint32_t version = 3) {
    std::vector<uint8_t> env(sealed_size(plaintext.size));
    colcrypt::seal(key, kKeyId, version, payload, context, plaintext, env.data());
    return env;
  }
  std::vector<uint8_t> open_value(ByteView env, ByteView context) {
    const EnvelopeHeader h = parse_header(env);
    (void)h;
    std::vector<uint8_t> out(opened_size(env));
    colcrypt::open(key, env, context, out.data());
    return out;
  }
};

// Opening must fail with one of the two expected errors, never succeed.
void require_rejected(AeadKey& key, ByteView env, ByteView context) {
  std::vector<uint8_t> out(env.size > kEnvelopeOverhead ? env.size - kEnvelopeOverhead : 0, 0xAA);
  try {
    colcrypt::open(key, env, context, out.data());
    FAIL("a tampered envelope opened");
  } catch (const Error& e) {
    const bool expected = e.code() == Errc::MalformedValue || e.code() == Errc::DecryptionFailed;
    REQUIRE(expected);
    if (e.code() == Errc::DecryptionFailed) {
      REQUIRE(std::string(e.what()) == "decryption failed");
      for (uint8_t b : out) REQUIRE(b == 0);  // no unauthenticated plaintext left behind
    }
  }
}

}  // namespace

TEST_CASE("envelope round trips", "[envelope]") {
  Fixture f;
  const std::string ctx_text = "customers.ssn:tenant=42";
  const ByteView contexts[] = {ByteView(), ByteView::of(ctx_text)};
  for (size_t n : {size_t{0}, size_t{1}, size_t{15}, size_t{16}, size_t{1} << 20}) {
    for (ByteView ctx : contexts) {
      for (PayloadType payload : {PayloadType::Bytes, PayloadType::Text}) {
        INFO("size " << n << ", context " << ctx.size << ", payload " << int(payload));
        const auto pt = sequence(n, 7);
        const auto env = f.seal_value(pt, ctx, payload, 42);
        REQUIRE(env.size() == n + 52);
        const EnvelopeHeader h = parse_header(env);
        REQUIRE(h.format_version == 1);
        REQUIRE(h.algorithm == Algorithm::Aes256Gcm);
        REQUIRE(h.payload == payload);
        REQUIRE(h.key_id == kKeyId);
        REQUIRE(h.key_version == 42);
        REQUIRE(opened_size(env) == n);
        REQUIRE(f.open_value(env, ctx) == pt);
      }
    }
  }
}

TEST_CASE("two seals of the same plaintext use different nonces", "[envelope]") {
  Fixture f;
  std::set<std::string> nonces;
  const auto pt = sequence(10);
  for (int i = 0; i < 64; ++i) {
    const auto env = f.seal_value(pt, ByteView());
    nonces.insert(hex(parse_header(env).nonce));
  }
  REQUIRE(nonces.size() == 64);
}

TEST_CASE("every single-bit flip of a sealed envelope is rejected", "[envelope]") {
  Fixture f;
  const auto ctx = ByteView::of("ctx");
  const auto env = f.seal_value(ByteView::of("hello"), ctx, PayloadType::Text);
  size_t flips = 0;
  for (size_t byte = 0; byte < env.size(); ++byte) {
    for (int bit = 0; bit < 8; ++bit) {
      INFO("byte " << byte << " bit " << bit);
      auto bad = env;
      bad[byte] ^= static_cast<uint8_t>(1u << bit);
      require_rejected(f.key, bad, ctx);
      ++flips;
    }
  }
  REQUIRE(flips == env.size() * 8);
}

TEST_CASE("every truncation and an appended byte are rejected", "[envelope]") {
  Fixture f;
  const auto env = f.seal_value(ByteView::of("some plaintext"), ByteView());
  for (size_t len = 0; len < env.size(); ++len) {
    INFO("length " << len);
    if (len < kEnvelopeOverhead) {
      REQUIRE_ERROR(parse_header(ByteView(env.data(), len)), Errc::MalformedValue,
                    "value too short");
    }
    require_rejected(f.key, ByteView(env.data(), len), ByteView());
  }
  auto longer = env;
  longer.push_back(0);
  REQUIRE_ERROR(f.open_value(longer, ByteView()), Errc::DecryptionFailed, "decryption failed");
}

TEST_CASE("wrong key, context, key id or version fail authentication", "[envelope]") {
  Fixture f;
  const auto ctx = ByteView::of("tenant=1");
  const auto env = f.seal_value(ByteView::of("4111111111111111"), ctx);
  std::vector<uint8_t> out(opened_size(env));

  SECTION("wrong key") {
    AeadKey other(sequence(32, 1));
    REQUIRE_ERROR(colcrypt::open(other, env, ctx, out.data()), Errc::DecryptionFailed,
                  "decryption failed");
  }
  SECTION("wrong context") {
    REQUIRE_ERROR(f.open_value(env, ByteView::of("tenant=2")), Errc::DecryptionFailed,
                  "decryption failed");
    REQUIRE_ERROR(f.open_value(env, ByteView()), Errc::DecryptionFailed, "decryption failed");
  }
  SECTION("key version changed in the header") {
    auto bad = env;
    bad[23] = 4;
    REQUIRE(parse_header(bad).key_version == 4);
    REQUIRE_ERROR(f.open_value(bad, ctx), Errc::DecryptionFailed, "decryption failed");
  }
  SECTION("key id changed in the header") {
    auto bad = env;
    bad[4] ^= 0xFF;
    REQUIRE_ERROR(f.open_value(bad, ctx), Errc::DecryptionFailed, "decryption failed");
  }
  SECTION("payload type changed in the header") {
    auto bad = env;
    bad[2] = 1;
    REQUIRE_ERROR(f.open_value(bad, ctx), Errc::DecryptionFailed, "decryption failed");
  }
}

TEST_CASE("parse_header names the failed check", "[envelope]") {
  Fixture f;
  const auto env = f.seal_value(ByteView::of("x"), ByteView());
  auto with = [&](size_t offset, uint8_t value) {
    auto v = env;
    v[offset] = value;
    return v;
  };
  REQUIRE_ERROR(parse_header(with(0, 2)), Errc::MalformedValue, "unsupported format version 2");
  REQUIRE_ERROR(parse_header(with(0, 0)), Errc::MalformedValue, "unsupported format version 0");
  REQUIRE_ERROR(parse_header(with(1, 2)), Errc::MalformedValue, "unknown algorithm 2");
  REQUIRE_ERROR(parse_header(with(2, 2)), Errc::MalformedValue, "unknown payload type");
  REQUIRE_ERROR(parse_header(with(3, 1)), Errc::MalformedValue, "reserved byte not zero");
  auto zero_version = env;
  std::memset(zero_version.data() + 20, 0, 4);
  REQUIRE_ERROR(parse_header(zero_version), Errc::MalformedValue, "key version 0");
  REQUIRE_ERROR(parse_header(ByteView()), Errc::MalformedValue, "value too short");
  // open() reports the structural problem, not a decryption failure.
  REQUIRE_ERROR(f.open_value(with(0, 2), ByteView()), Errc::MalformedValue,
                "unsupported format version 2");
  // Big-endian version.
  auto v = env;
  v[20] = 0x01, v[21] = 0x02, v[22] = 0x03, v[23] = 0x04;
  REQUIRE(parse_header(v).key_version == 0x01020304u);
}

TEST_CASE("seal argument checks", "[envelope]") {
  Fixture f;
  uint8_t out[kEnvelopeOverhead];
  const uint8_t nonce[12] = {};
  REQUIRE_ERRC(colcrypt::seal(f.key, kKeyId, 0, PayloadType::Bytes, ByteView(), ByteView(), out),
               Errc::InvalidArgument);
  REQUIRE_ERRC(
      colcrypt::seal(f.key, kKeyId, 1, static_cast<PayloadType>(2), ByteView(), ByteView(), out),
      Errc::InvalidArgument);
  // Rejected before any byte is read or written.
  REQUIRE_ERRC(detail::seal_with_nonce(f.key, kKeyId, 1, PayloadType::Bytes, ByteView(),
                                       ByteView(nullptr, kMaxPlaintextSize + 1), nonce, out),
               Errc::InvalidArgument);
  REQUIRE(sealed_size(0) == 52);
  REQUIRE(sealed_size(11) == 63);
}

TEST_CASE("the worked example of docs/format.md, byte for byte", "[envelope]") {
  // Inputs exactly as listed in docs/format.md.
  AeadKey key(sequence(32));  // 00 01 02 ... 1f
  KeyId id{};
  REQUIRE(parse_key_id("0f1e2d3c-4b5a-4978-8796-a5b4c3d2e1f0", id));
  const auto nonce = unhex("cafebabefacedbaddecaf888");
  const auto context = ByteView::of("tenant=42");
  const auto plaintext = ByteView::of("123-45-6789");
  const std::string expected_hex =
      "010101000f1e2d3c4b5a49788796a5b4c3d2e1f000000003cafebabefacedbaddecaf888bb91930b9e4f622d7133"
      "64cbc4cf0832a7da45159635095d25e9a5";
  const std::string expected_text =
      "colcrypt:"
      "AQEBAA8eLTxLWkl4h5altMPS4fAAAAADyv66vvrO263eyviIu5GTC55PYi1xM2TLxM8IMqfaRRWWNQldJeml";

  std::vector<uint8_t> env(sealed_size(plaintext.size));
  detail::seal_with_nonce(key, id, 3, PayloadType::Text, context, plaintext, nonce.data(),
                          env.data());
  REQUIRE(hex(env) == expected_hex);
  REQUIRE(encode_text(env) == expected_text);

  std::vector<uint8_t> decoded(decoded_size_bound(expected_text.size()));
  decoded.resize(decode_text(expected_text, decoded.data(), decoded.size()));
  REQUIRE(decoded == env);
  std::vector<uint8_t> out(opened_size(decoded));
  colcrypt::open(key, decoded, context, out.data());
  REQUIRE(std::string(out.begin(), out.end()) == "123-45-6789");
}

namespace {

std::vector<uint8_t> decode(const std::string& text) {
  std::vector<uint8_t> out(decoded_size_bound(text.size()));
  out.resize(decode_text(text, out.data(), out.size()));
  return out;
}

std::string encode(const std::string& raw) { return encode_text(ByteView::of(raw)); }

}  // namespace

TEST_CASE("text form: RFC 4648 vectors and round trips", "[envelope][text]") {
  const std::pair<std::string, std::string> rfc[] = {{"", ""},
                                                     {"f", "Zg=="},
                                                     {"fo", "Zm8="},
                                                     {"foo", "Zm9v"},
                                                     {"foob", "Zm9vYg=="},
                                                     {"fooba", "Zm9vYmE="},
                                                     {"foobar", "Zm9vYmFy"}};
  for (const auto& [raw, b64] : rfc) {
    REQUIRE(encode(raw) == "colcrypt:" + b64);
    REQUIRE(text_size(raw.size()) == 9 + b64.size());
    const auto back = decode("colcrypt:" + b64);
    REQUIRE(std::string(back.begin(), back.end()) == raw);
  }
  for (size_t n = 0; n < 300; ++n) {
    const auto data = sequence(n, static_cast<uint8_t>(n * 13));
    const std::string text = encode_text(data);
    REQUIRE(decode(text) == data);
    REQUIRE(decoded_size_bound(text.size()) >= n);
  }
  std::string all_bytes;
  for (int i = 0; i < 256; ++i) all_bytes.push_back(static_cast<char>(i));
  const auto back = decode(encode(all_bytes));
  REQUIRE(std::string(back.begin(), back.end()) == all_bytes);
}

TEST_CASE("text form: non-canonical and invalid spellings are rejected", "[envelope][text]") {
  const std::string bad[] = {
      "",                     // no prefix at all
      "Zm9v",                 // missing prefix
      "colcrypt",             // prefix without colon
      "Colcrypt:Zm9v",        // prefix is case-sensitive
      " colcrypt:Zm9v",       // leading whitespace
      "colcrypt: Zm9v",       // whitespace after the prefix
      "colcrypt:Zm9v ",       // trailing whitespace
      "colcrypt:Zm9v\n",      // trailing newline
      "colcrypt:Zm9v\nZm9v",  // embedded line break
      "colcrypt:Zm 9v",       // embedded space
      "colcrypt:Zm9",         // length not a multiple of 4
      "colcrypt:Zg",          // padding missing
      "colcrypt:Zg=",         // padding short
      "colcrypt:Zg===",       // too much padding
      "colcrypt:====",        // nothing but padding
      "colcrypt:Z===",
      "colcrypt:=Zg=",      // padding at the front
      "colcrypt:Zg==Zm9v",  // padding in the middle
      "colcrypt:Zh==",      // non-zero trailing bits (1 byte)
      "colcrypt:Zm9=",      // non-zero trailing bits (2 bytes)
      "colcrypt:Zm-v",      // URL-safe alphabet
      "colcrypt:Zm_v",
      "colcrypt:Zm9v!!!!",  // outside the alphabet
      std::string("colcrypt:Zm9v\0\0\0\0", 17),
      "colcrypt:Zm9v\xC3\xA9\xC3\xA9",
  };
  for (const auto& text : bad) {
    INFO("text: '" << text << "'");
    std::vector<uint8_t> out(decoded_size_bound(text.size()));
    REQUIRE_ERRC(decode_text(text, out.data(), out.size()), Errc::MalformedValue);
  }
  // A buffer that is too small is the caller's error, not a malformed value.
  uint8_t small[2];
  REQUIRE_ERRC(decode_text("colcrypt:Zm9v", small, sizeof small), Errc::InvalidArgument);
}

TEST_CASE("text form: exactly the canonical 4-character groups decode", "[envelope][text]") {
  // Every string of four characters from the alphabet plus '=' (65^4 of them):
  // decoding succeeds exactly for the 2^24 + 2^16 + 2^8 canonical encodings,
  // and each of those re-encodes to itself.
  const std::string alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=";
  std::string text = "colcrypt:AAAA";
  uint8_t out[3];
  char re[13];
  size_t accepted = 0, rejected = 0, mismatched = 0;
  for (char a : alphabet) {
    text[9] = a;
    for (char b : alphabet) {
      text[10] = b;
      for (char c : alphabet) {
        text[11] = c;
        for (char d : alphabet) {
          text[12] = d;
          size_t n = 0;
          try {
            n = decode_text(text, out, sizeof out);
          } catch (const Error&) {
            ++rejected;
            continue;
          }
          ++accepted;
          if (text_size(n) != text.size()) {
            ++mismatched;
            continue;
          }
          encode_text(ByteView(out, n), re);
          if (std::memcmp(re, text.data(), text.size()) != 0) ++mismatched;
        }
      }
    }
  }
  REQUIRE(mismatched == 0);
  REQUIRE(accepted == (size_t{1} << 24) + (size_t{1} << 16) + (size_t{1} << 8));
  REQUIRE(accepted + rejected == size_t{65} * 65 * 65 * 65);
}

TEST_CASE("key ids print and parse as UUIDs", "[envelope][key_id]") {
  REQUIRE(format_key_id(kKeyId) == "0f1e2d3c-4b5a-4978-8796-a5b4c3d2e1f0");
  KeyId id{};
  REQUIRE(parse_key_id("0F1E2D3C-4B5A-4978-8796-A5B4C3D2E1F0", id));
  REQUIRE(id == kKeyId);
  REQUIRE(format_key_id(id) == "0f1e2d3c-4b5a-4978-8796-a5b4c3d2e1f0");
  const KeyId before = id;
  for (const char* bad :
       {"", "0f1e2d3c4b5a49788796a5b4c3d2e1f0", "{0f1e2d3c-4b5a-4978-8796-a5b4c3d2e1f0}",
        "0f1e2d3c-4b5a-4978-8796-a5b4c3d2e1f", "0f1e2d3c-4b5a-4978-8796-a5b4c3d2e1f00",
        "0f1e2d3c-4b5a-4978-8796a-5b4c3d2e1f0", "0f1e2d3c-4b5a-4978-8796-a5b4c3d2e1g0",
        "0f1e2d3c 4b5a 4978 8796 a5b4c3d2e1f0", " f1e2d3c-4b5a-4978-8796-a5b4c3d2e1f0"}) {
    INFO(bad);
    REQUIRE_FALSE(parse_key_id(bad, id));
    REQUIRE(id == before);
  }
}

TEST_CASE("new key ids are random version 4 UUIDs", "[envelope][key_id]") {
  std::set<std::string> seen;
  for (int i = 0; i < 32; ++i) {
    const KeyId id = new_key_id();
    REQUIRE((id[6] & 0xF0) == 0x40);
    REQUIRE((id[8] & 0xC0) == 0x80);
    const std::string text = format_key_id(id);
    REQUIRE(text[14] == '4');
    KeyId back{};
    REQUIRE(parse_key_id(text, back));
    REQUIRE(back == id);
    seen.insert(text);
  }
  REQUIRE(seen.size() == 32);
}

TEST_CASE("key names", "[envelope][key_name]") {
  for (const char* good : {"a", "customer_ssn", "Key-1.v2", "_x", "0", "A.b-c_d"}) {
    INFO(good);
    REQUIRE(valid_key_name(good));
  }
  REQUIRE(valid_key_name(std::string(63, 'k')));
  REQUIRE_FALSE(valid_key_name(std::string(64, 'k')));
  for (const char* bad :
       {"", ".hidden", "-flag", "a b", "a/b", "a:b", "ключ", "a\n", "a'b", "a\"b", "a;b", "*"}) {
    INFO(bad);
    REQUIRE_FALSE(valid_key_name(bad));
  }
  REQUIRE_FALSE(valid_key_name(std::string("a\0b", 3)));
}
