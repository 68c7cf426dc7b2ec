// Derived-key envelopes (algorithm 3; docs/format.md, docs/rotation.md).
#include <catch2/catch.hpp>
#include <cstring>
#include <string>
#include <vector>

#include "core/envelope.hpp"
#include "core/error.hpp"
#include "core/secure_memory.hpp"

using namespace colcrypt;

namespace {

std::vector<uint8_t> seal_derived(const SecretBytes& version_key, const KeyId& id, uint32_t version,
                                  const std::string& context, const std::string& plaintext) {
  AeadKey key(derive_value_key(version_key.view(), id, version, ByteView::of(context)).view());
  std::vector<uint8_t> out(sealed_size(plaintext.size()));
  seal(key, id, version, PayloadType::Text, ByteView::of(context), ByteView::of(plaintext),
       out.data(), Algorithm::Aes256GcmDerived);
  return out;
}

bool opens(AeadKey& key, const std::vector<uint8_t>& env, const std::string& context) {
  std::vector<uint8_t> out(opened_size(ByteView(env)));
  try {
    open(key, ByteView(env), ByteView::of(context), out.data());
    return true;
  } catch (const Error& e) {
    REQUIRE(e.code() == Errc::DecryptionFailed);
    return false;
  }
}

}  // namespace

TEST_CASE("derived keys: one key per context, marked in the envelope", "[envelope][derived]") {
  SecretBytes version_key = SecretBytes::random(32);
  const KeyId id = new_key_id();
  auto env = seal_derived(version_key, id, 7, "tenant:a", "secret");
  EnvelopeHeader h = parse_header(ByteView(env));
  CHECK(h.algorithm == Algorithm::Aes256GcmDerived);
  CHECK(env[1] == 3);
  CHECK(h.key_version == 7);

  AeadKey for_a(derive_value_key(version_key.view(), id, 7, ByteView::of("tenant:a")).view());
  AeadKey for_b(derive_value_key(version_key.view(), id, 7, ByteView::of("tenant:b")).view());
  AeadKey plain(version_key.view());
  CHECK(opens(for_a, env, "tenant:a"));
  // Neither another context's key nor the version key itself opens it.
  CHECK_FALSE(opens(for_b, env, "tenant:a"));
  CHECK_FALSE(opens(plain, env, "tenant:a"));
  CHECK_FALSE(opens(for_a, env, "tenant:b"));
  // A plain envelope relabelled as derived (or back) fails: byte 1 is AAD.
  auto relabelled = env;
  relabelled[1] = 1;
  CHECK_FALSE(opens(for_a, relabelled, "tenant:a"));
  CHECK_FALSE(opens(plain, relabelled, "tenant:a"));
}

TEST_CASE("derived keys: separated by context, key id and version", "[envelope][derived]") {
  SecretBytes k = SecretBytes::random(32);
  const KeyId id = new_key_id();
  const KeyId other = new_key_id();
  auto bytes = [](const SecretBytes& s) {
    return std::vector<uint8_t>(s.data(), s.data() + s.size());
  };
  const auto a1 = bytes(derive_value_key(k.view(), id, 1, ByteView::of("a")));
  CHECK(a1.size() == 32);
  CHECK(a1 == bytes(derive_value_key(k.view(), id, 1, ByteView::of("a"))));  // deterministic
  CHECK(a1 != bytes(derive_value_key(k.view(), id, 1, ByteView::of("b"))));
  CHECK(a1 != bytes(derive_value_key(k.view(), id, 2, ByteView::of("a"))));  // rotation
  CHECK(a1 != bytes(derive_value_key(k.view(), other, 1, ByteView::of("a"))));
  CHECK(a1 != std::vector<uint8_t>(k.data(), k.data() + 32));
  // "a" + version 1 must not collide with a context that spells the same bytes differently.
  CHECK(bytes(derive_value_key(k.view(), id, 1, ByteView::of("ab"))) !=
        bytes(derive_value_key(k.view(), id, 1, ByteView::of("a"))));
  CHECK_THROWS_AS(derive_value_key(ByteView::of("short"), id, 1, ByteView::of("a")), Error);
}

TEST_CASE("derived keys: the algorithm byte is validated", "[envelope][derived]") {
  SecretBytes k = SecretBytes::random(32);
  auto env = seal_derived(k, new_key_id(), 1, "c", "x");
  for (uint8_t algorithm : {0, 2, 4, 255}) {
    auto bad = env;
    bad[1] = algorithm;
    CHECK_THROWS_AS(parse_header(ByteView(bad)), Error);
  }
}
