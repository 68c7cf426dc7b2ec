// The colcrypt-file streaming format (core/stream.hpp, docs/format.md "Files").
#include <catch2/catch.hpp>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "core/secure_memory.hpp"
#include "core/stream.hpp"
#include "support.hpp"

using namespace colcrypt;
using namespace colcrypt::stream;

namespace {

using Bytes = std::vector<uint8_t>;

const KeyId kId = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
constexpr uint32_t kVersion = 3;
constexpr uint32_t kSmallChunk = 64;
constexpr size_t kRecord = kSmallChunk + kGcmTagSize;

Bytes pattern(size_t n, uint8_t seed = 7) {
  Bytes v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(seed + i * 31 + (i >> 8));
  return v;
}

Bytes version_key(uint8_t seed = 1) { return pattern(32, seed); }

Source source_of(const Bytes& bytes, size_t& pos, size_t max_read = SIZE_MAX) {
  return [&bytes, &pos, max_read](uint8_t* buffer, size_t n) {
    const size_t take = std::min({n, bytes.size() - pos, max_read});
    if (take > 0) std::memcpy(buffer, bytes.data() + pos, take);  // an empty vector's data() may be null
    pos += take;
    return take;
  };
}

Bytes encrypt_bytes(const Bytes& plain, uint32_t chunk = kSmallChunk,
                    const std::string& context = "", const Bytes& vkey = version_key(),
                    size_t max_read = SIZE_MAX) {
  SecretBytes data_key;
  const FileHeader h =
      new_header(ByteView(vkey), kId, kVersion, ByteView::of(context), chunk, data_key);
  Bytes out;
  size_t pos = 0;
  const uint64_t n =
      encrypt(h, data_key.view(), source_of(plain, pos, max_read),
              [&](const uint8_t* d, size_t len) { out.insert(out.end(), d, d + len); });
  REQUIRE(n == plain.size());
  return out;
}

struct Outcome {
  std::optional<StreamErrc> error;  // none: the stream verified to its end
  Bytes output;                     // what reached the sink (whether or not it failed)
};

Outcome decrypt_bytes(const Bytes& file, const std::string& context = "",
                      const Bytes& vkey = version_key(), size_t max_read = SIZE_MAX) {
  Outcome o;
  size_t pos = 0;
  try {
    const uint64_t n = decrypt(
        source_of(file, pos, max_read),
        [&](const FileHeader& h) {
          return unwrap_data_key(h, ByteView(vkey), ByteView::of(context));
        },
        [&](const uint8_t* d, size_t len) { o.output.insert(o.output.end(), d, d + len); });
    REQUIRE(n == o.output.size());
  } catch (const StreamError& e) {
    o.error = e.reason();
  }
  return o;
}

size_t expected_size(size_t plain, size_t chunk) {
  const size_t chunks = plain == 0 ? 1 : (plain + chunk - 1) / chunk;
  return kFileHeaderSize + plain + chunks * kGcmTagSize;
}

std::string reason(const Outcome& o) {
  return o.error ? stream_errc_name(*o.error) : std::string("verified");
}

bool is_prefix(const Bytes& part, const Bytes& whole) {
  return part.size() <= whole.size() && std::equal(part.begin(), part.end(), whole.begin());
}

}  // namespace

TEST_CASE("stream: round trips at chunk boundaries", "[stream]") {
  for (const uint32_t chunk : {kSmallChunk, kDefaultChunkSize}) {
    for (const size_t size : {size_t{0}, size_t{1}, size_t{chunk - 1}, size_t{chunk},
                              size_t{chunk + 1}, size_t{3 * chunk}, size_t{5 * chunk + 17}}) {
      CAPTURE(chunk, size);
      const Bytes plain = pattern(size);
      const Bytes file = encrypt_bytes(plain, chunk, "ctx");
      REQUIRE(file.size() == expected_size(size, chunk));
      const Outcome o = decrypt_bytes(file, "ctx");
      REQUIRE(reason(o) == "verified");
      REQUIRE(o.output == plain);
      // Short reads (a pipe) change nothing.
      REQUIRE(encrypt_bytes(plain, chunk, "ctx", version_key(), 7).size() == file.size());
      REQUIRE(decrypt_bytes(file, "ctx", version_key(), 5).output == plain);
    }
  }
}

TEST_CASE("stream: an empty input is one empty final chunk", "[stream]") {
  const Bytes file = encrypt_bytes({});
  REQUIRE(file.size() == kFileHeaderSize + kGcmTagSize);
  REQUIRE(reason(decrypt_bytes(file)) == "verified");
}

TEST_CASE("stream: a last chunk of exactly the chunk size is sealed as the last", "[stream]") {
  const Bytes plain = pattern(3 * kSmallChunk);
  const Bytes file = encrypt_bytes(plain);
  REQUIRE(file.size() == kFileHeaderSize + 3 * kRecord);  // no extra empty chunk
  REQUIRE(decrypt_bytes(file).output == plain);
  // Without its last chunk the file is truncated, never complete.
  const Bytes cut(file.begin(), file.end() - kRecord);
  REQUIRE(reason(decrypt_bytes(cut)) == "Truncated");
}

TEST_CASE("stream: wrong key and wrong context fail at the header", "[stream]") {
  const Bytes file = encrypt_bytes(pattern(200), kSmallChunk, "tenant:1");
  REQUIRE(reason(decrypt_bytes(file, "tenant:1", version_key(2))) == "HeaderAuthFailed");
  REQUIRE(reason(decrypt_bytes(file, "tenant:2")) == "HeaderAuthFailed");
  REQUIRE(reason(decrypt_bytes(file, "")) == "HeaderAuthFailed");
  REQUIRE(decrypt_bytes(file, "tenant:2").output.empty());
}

TEST_CASE("stream: truncation at every byte fails, and only verified chunks come out", "[stream]") {
  // 200 bytes: chunks of 64, 64, 64 and 8; and 192 bytes: a full last chunk.
  for (const size_t size : {size_t{200}, size_t{192}}) {
    const Bytes plain = pattern(size);
    const Bytes file = encrypt_bytes(plain);
    for (size_t len = 0; len < file.size(); ++len) {
      CAPTURE(size, len);
      const Outcome o = decrypt_bytes(Bytes(file.begin(), file.begin() + len));
      REQUIRE(o.error.has_value());
      REQUIRE(is_prefix(o.output, plain));
      REQUIRE(o.output.size() < plain.size());
      // Inside the header, at a chunk boundary, or inside a last tag: certainly
      // truncated. Inside a chunk: the cut chunk cannot verify.
      const bool at_boundary =
          len < kFileHeaderSize || (len - kFileHeaderSize) % kRecord < kGcmTagSize;
      REQUIRE(reason(o) == (at_boundary ? "Truncated" : "ChunkAuthFailed"));
    }
  }
}

TEST_CASE("stream: every flipped bit is detected", "[stream]") {
  const Bytes plain = pattern(150);  // chunks of 64, 64, 22
  const Bytes file = encrypt_bytes(plain, kSmallChunk, "c");
  for (size_t byte = 0; byte < file.size(); ++byte) {
    for (int bit = 0; bit < 8; ++bit) {
      CAPTURE(byte, bit);
      Bytes bad = file;
      bad[byte] ^= static_cast<uint8_t>(1u << bit);
      const Outcome o = decrypt_bytes(bad, "c");
      REQUIRE(o.error.has_value());
      REQUIRE(is_prefix(o.output, plain));
      const std::string r = reason(o);
      if (byte < 8) {
        REQUIRE(r == "NotAStream");
      } else if (byte < 10) {
        REQUIRE(r == "UnsupportedVersion");
      } else if (byte < 12) {
        REQUIRE(r == "MalformedHeader");
      } else if (byte < 16) {
        // A chunk size out of range, else one the wrap does not authenticate.
        REQUIRE((r == "MalformedHeader" || r == "HeaderAuthFailed"));
      } else if (byte < kFileHeaderSize) {
        REQUIRE(r == "HeaderAuthFailed");
      } else {
        REQUIRE(r == "ChunkAuthFailed");
      }
    }
  }
}

TEST_CASE("stream: chunks reordered, duplicated or dropped", "[stream]") {
  const Bytes plain = pattern(4 * kSmallChunk + 10);  // 5 chunks
  const Bytes file = encrypt_bytes(plain);
  auto chunk_at = [&](size_t i) {
    return Bytes(file.begin() + kFileHeaderSize + i * kRecord,
                 file.begin() + std::min(file.size(), kFileHeaderSize + (i + 1) * kRecord));
  };
  auto assemble = [&](std::initializer_list<size_t> order) {
    Bytes out(file.begin(), file.begin() + kFileHeaderSize);
    for (size_t i : order) {
      const Bytes c = chunk_at(i);
      out.insert(out.end(), c.begin(), c.end());
    }
    return out;
  };
  REQUIRE(decrypt_bytes(assemble({0, 1, 2, 3, 4})).output == plain);
  REQUIRE(reason(decrypt_bytes(assemble({1, 0, 2, 3, 4}))) == "ChunkAuthFailed");  // swapped
  REQUIRE(reason(decrypt_bytes(assemble({0, 1, 3, 2, 4}))) == "ChunkAuthFailed");
  REQUIRE(reason(decrypt_bytes(assemble({0, 0, 1, 2, 3, 4}))) == "ChunkAuthFailed");  // duplicated
  REQUIRE(reason(decrypt_bytes(assemble({0, 1, 2, 3, 3, 4}))) == "ChunkAuthFailed");
  REQUIRE(reason(decrypt_bytes(assemble({0, 2, 3, 4}))) == "ChunkAuthFailed");  // dropped
  REQUIRE(reason(decrypt_bytes(assemble({0, 1, 2, 3}))) == "Truncated");        // last dropped
  REQUIRE(reason(decrypt_bytes(assemble({0, 1, 2, 4}))) == "ChunkAuthFailed");
  // The last chunk moved forward: it is not at its index.
  REQUIRE(reason(decrypt_bytes(assemble({4}))) == "ChunkAuthFailed");
}

TEST_CASE("stream: headers and chunks from another file", "[stream]") {
  const Bytes plain = pattern(3 * kSmallChunk + 5);
  const Bytes a = encrypt_bytes(plain);
  const Bytes b = encrypt_bytes(plain);  // same key, context and content
  REQUIRE(Bytes(a.begin() + kFileHeaderSize, a.end()) !=
          Bytes(b.begin() + kFileHeaderSize, b.end()));
  Bytes mixed(a.begin(), a.begin() + kFileHeaderSize);  // a's header, b's chunks
  mixed.insert(mixed.end(), b.begin() + kFileHeaderSize, b.end());
  REQUIRE(reason(decrypt_bytes(mixed)) == "ChunkAuthFailed");
  Bytes spliced = a;  // chunk 1 of b at index 1 of a
  std::copy(b.begin() + kFileHeaderSize + kRecord, b.begin() + kFileHeaderSize + 2 * kRecord,
            spliced.begin() + kFileHeaderSize + kRecord);
  const Outcome o = decrypt_bytes(spliced);
  REQUIRE(reason(o) == "ChunkAuthFailed");
  REQUIRE(o.output == Bytes(plain.begin(), plain.begin() + kSmallChunk));  // chunk 0 only
}

TEST_CASE("stream: data appended after the last chunk", "[stream]") {
  // A full last chunk followed by anything: it verifies as the last, so the
  // extra bytes are named as such.
  const Bytes full = encrypt_bytes(pattern(2 * kSmallChunk));
  for (const size_t extra : {size_t{1}, size_t{16}, kRecord, 3 * kRecord + 5}) {
    CAPTURE(extra);
    Bytes bad = full;
    const Bytes more = pattern(extra, 99);
    bad.insert(bad.end(), more.begin(), more.end());
    REQUIRE(reason(decrypt_bytes(bad)) == "TrailingData");
  }
  // A file appended to itself.
  Bytes twice = full;
  twice.insert(twice.end(), full.begin(), full.end());
  REQUIRE(reason(decrypt_bytes(twice)) == "TrailingData");
  // A short last chunk followed by bytes reads as a chunk that does not verify.
  Bytes bad = encrypt_bytes(pattern(2 * kSmallChunk + 3));
  bad.push_back(0);
  REQUIRE(reason(decrypt_bytes(bad)) == "ChunkAuthFailed");
}

TEST_CASE("stream: rewrap changes only the header", "[stream]") {
  const Bytes plain = pattern(300);
  const Bytes file = encrypt_bytes(plain, kSmallChunk, "ctx");
  const FileHeader h = parse_file_header(ByteView(file.data(), kFileHeaderSize));
  const Bytes new_key = version_key(9);
  const FileHeader moved =
      rewrap_header(h, ByteView(version_key()), ByteView(new_key), 4, ByteView::of("ctx"));
  REQUIRE(moved.key_version == 4);
  REQUIRE(moved.salt == h.salt);
  REQUIRE(moved.wrap_nonce != h.wrap_nonce);
  Bytes rewrapped = file;
  const auto encoded = encode_file_header(moved);
  std::copy(encoded.begin(), encoded.end(), rewrapped.begin());
  REQUIRE(decrypt_bytes(rewrapped, "ctx", new_key).output == plain);
  REQUIRE(reason(decrypt_bytes(rewrapped, "ctx", version_key())) == "HeaderAuthFailed");
  // The version number is authenticated: the old header relabelled fails.
  Bytes relabelled = file;
  relabelled[35] = 4;
  REQUIRE(reason(decrypt_bytes(relabelled, "ctx")) == "HeaderAuthFailed");
  REQUIRE_THROWS_AS(
      rewrap_header(h, ByteView(version_key()), ByteView(new_key), 4, ByteView::of("other")),
      StreamError);
}

TEST_CASE("stream: header checks", "[stream]") {
  const Bytes file = encrypt_bytes(pattern(10));
  REQUIRE(reason(decrypt_bytes({})) == "Truncated");
  REQUIRE(reason(decrypt_bytes(Bytes(file.begin(), file.begin() + 3))) == "Truncated");
  REQUIRE(reason(decrypt_bytes(pattern(500))) == "NotAStream");
  Bytes plain_text = {'h', 'e', 'l', 'l', 'o'};
  REQUIRE(reason(decrypt_bytes(plain_text)) == "NotAStream");
  Bytes later = file;
  later[8] = 2;
  REQUIRE(reason(decrypt_bytes(later)) == "UnsupportedVersion");
  Bytes huge = file;  // a header asking for a 4 GiB chunk is refused before any allocation
  huge[12] = 0xff;
  REQUIRE(reason(decrypt_bytes(huge)) == "MalformedHeader");
  Bytes zero_version = file;
  std::fill(zero_version.begin() + 32, zero_version.begin() + 36, 0);
  REQUIRE(reason(decrypt_bytes(zero_version)) == "MalformedHeader");
  SecretBytes dk;
  const Bytes vkey = version_key();
  REQUIRE_ERRC(new_header(ByteView(vkey), kId, 1, {}, kMinChunkSize - 1, dk),
               Errc::InvalidArgument);
  REQUIRE_ERRC(new_header(ByteView(vkey), kId, 1, {}, kMaxChunkSize + 1, dk),
               Errc::InvalidArgument);
  REQUIRE_ERRC(new_header(ByteView(vkey), kId, 0, {}, kSmallChunk, dk), Errc::InvalidArgument);
}

TEST_CASE("stream: errors carry the classes colcrypt-file maps to exit codes", "[stream]") {
  REQUIRE(StreamError(StreamErrc::Truncated, "x").code() == Errc::DecryptionFailed);
  REQUIRE(StreamError(StreamErrc::ChunkAuthFailed, "x").code() == Errc::DecryptionFailed);
  REQUIRE(StreamError(StreamErrc::NotAStream, "x").code() == Errc::MalformedValue);
}
