// Known answers from the RFCs (independent of the Wycheproof files, so they
// run even where the vectors are absent) and the parameter checks.
#include <catch2/catch.hpp>
#include <string>

#include "core/kdf.hpp"
#include "support.hpp"

using namespace colcrypt;
using colcrypt::test::hex;
using colcrypt::test::unhex;

TEST_CASE("HKDF-SHA256 RFC 5869 test cases 1 and 3", "[kdf]") {
  const auto ikm = unhex("0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b");
  const SecretBytes tc1 =
      hkdf_sha256(ikm, unhex("000102030405060708090a0b0c"), unhex("f0f1f2f3f4f5f6f7f8f9"), 42);
  CHECK(hex(tc1.data(), tc1.size()) ==
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865");
  const SecretBytes tc3 = hkdf_sha256(ikm, ByteView(), ByteView(), 42);
  CHECK(hex(tc3.data(), tc3.size()) ==
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8");
}

TEST_CASE("HKDF-SHA256 limits", "[kdf]") {
  const auto ikm = unhex("00112233445566778899aabbccddeeff");
  REQUIRE_ERRC(hkdf_sha256(ikm, ByteView(), ByteView(), 0), Errc::InvalidArgument);
  REQUIRE_ERRC(hkdf_sha256(ikm, ByteView(), ByteView(), 255 * 32 + 1), Errc::InvalidArgument);
  REQUIRE(hkdf_sha256(ikm, ByteView(), ByteView(), 255 * 32).size() == 255 * 32);
  REQUIRE(hkdf_sha256(ikm, ByteView(), ByteView(), 1).size() == 1);
  // An empty IKM is legal in RFC 5869; it must not be confused with "no key".
  const SecretBytes empty_ikm = hkdf_sha256(ByteView(), ByteView(), ByteView(), 32);
  REQUIRE(empty_ikm.size() == 32);
  // Distinct info gives independent keys.
  const SecretBytes a = hkdf_sha256(ikm, ByteView(), ByteView::of("tenant-a"), 32);
  const SecretBytes b = hkdf_sha256(ikm, ByteView(), ByteView::of("tenant-b"), 32);
  REQUIRE_FALSE(constant_time_equal(a.view(), b.view()));
}

TEST_CASE("PBKDF2-HMAC-SHA256 RFC 7914 section 11 vectors", "[kdf]") {
  const SecretBytes one = pbkdf2_sha256(ByteView::of("passwd"), ByteView::of("salt"), 1, 64);
  CHECK(hex(one.data(), one.size()) ==
        "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc49ca9cccf179b645991664b39d"
        "77ef317c71b845b1e30bd509112041d3a19783");
  const SecretBytes many = pbkdf2_sha256(ByteView::of("Password"), ByteView::of("NaCl"), 80000, 64);
  CHECK(hex(many.data(), many.size()) ==
        "4ddcd8f60b98be21830cee5ef22701f9641a4418d04c0414aeff08876b34ab56a1d425a1225833549adb841b51"
        "c9b3176a272bdebba1d078478f62b397f33c8d");
}

TEST_CASE("PBKDF2-HMAC-SHA256 limits", "[kdf]") {
  REQUIRE_ERRC(pbkdf2_sha256(ByteView::of("pw"), ByteView::of("salt"), 0, 32),
               Errc::InvalidArgument);
  REQUIRE_ERRC(pbkdf2_sha256(ByteView::of("pw"), ByteView::of("salt"), 1, 0),
               Errc::InvalidArgument);
  // Empty password and salt are the caller's choice, not an error here.
  REQUIRE(pbkdf2_sha256(ByteView(), ByteView(), 1, 32).size() == 32);
}

TEST_CASE("HMAC-SHA256 RFC 4231 test case 2 and empty inputs", "[kdf]") {
  const auto tag = hmac_sha256(ByteView::of("Jefe"), ByteView::of("what do ya want for nothing?"));
  CHECK(hex(tag) == "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
  const auto empty = hmac_sha256(ByteView(), ByteView());
  CHECK(hex(empty) == "b613679a0814d9ec772f95d778c35fc5ff1697c493715653c6c712144292c5ad");
}

TEST_CASE("HmacSha256 keeps its key across messages and joins the parts", "[kdf]") {
  const std::string expected = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";
  HmacSha256 hmac(ByteView::of("Jefe"));
  CHECK(hex(hmac.mac(ByteView::of("what do ya want for nothing?"))) == expected);
  // Another message in between must not leak into the next tag.
  CHECK(hex(hmac.mac(ByteView())) != expected);
  CHECK(hex(hmac.mac(ByteView::of("what do ya "), ByteView::of("want for "),
                     ByteView::of("nothing?"))) == expected);
  CHECK(hex(hmac.mac(ByteView::of("what do ya want for nothing?"), ByteView(), ByteView())) ==
        expected);
  HmacSha256 moved(std::move(hmac));
  CHECK(hex(moved.mac(ByteView::of("what do ya want for nothing?"))) == expected);
}
