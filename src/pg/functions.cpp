// The SQL functions of the extension: encrypt_field, decrypt_field,
// decrypt_field_bytea and the inspectors key_id, key_version and key_name.
//
// Shape of every function: Postgres work first (detoast the arguments, snapshot
// the GUCs, palloc the result, whose size is known before any crypto runs:
// sealed_size(n) to encrypt, opened_size(envelope) to decrypt), then the C++
// part through guarded(), which writes into the result, then Postgres work
// again (encoding check, building the Datum).

// postgres.h must come first: keep clang-format from sorting it.
// clang-format off
extern "C" {
#include "postgres.h"

#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/uuid.h"
}
// clang-format on

#include <cstdint>
#include <cstring>
#include <string_view>

#include "core/envelope.hpp"
#include "core/secure_memory.hpp"
#include "pg/guard.hpp"
#include "pg/key_cache.hpp"
#include "pg/module.hpp"

using colcrypt::ByteView;
using colcrypt::EnvelopeHeader;
using colcrypt::PayloadType;
using colcrypt::pg::guarded;
using colcrypt::pg::KeydSettings;
using colcrypt::pg::ValueOrigin;

extern "C" {
PG_FUNCTION_INFO_V1(colcrypt_encrypt_text);
PG_FUNCTION_INFO_V1(colcrypt_encrypt_bytea);
PG_FUNCTION_INFO_V1(colcrypt_decrypt_text);
PG_FUNCTION_INFO_V1(colcrypt_decrypt_bytea);
PG_FUNCTION_INFO_V1(colcrypt_key_id);
PG_FUNCTION_INFO_V1(colcrypt_key_version);
PG_FUNCTION_INFO_V1(colcrypt_key_name);
}

namespace {

ByteView bytes_of(const struct varlena* v) {
  return ByteView(reinterpret_cast<const uint8_t*>(VARDATA_ANY(v)), VARSIZE_ANY_EXHDR(v));
}

// The optional context argument (AAD); omitted means empty.
ByteView context_arg(FunctionCallInfo fcinfo, int argno) {
  if (PG_NARGS() <= argno) return ByteView();
  return bytes_of(PG_GETARG_TEXT_PP(argno));
}

Datum encrypt_field(FunctionCallInfo fcinfo, PayloadType payload) {
  const ByteView plaintext = bytes_of(PG_GETARG_VARLENA_PP(0));
  const ByteView name = bytes_of(PG_GETARG_TEXT_PP(1));
  const ByteView context = context_arg(fcinfo, 2);

  if (plaintext.size > MaxAllocSize - VARHDRSZ - colcrypt::kEnvelopeOverhead)
    ereport(ERROR, (errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED), errmsg("value too large to encrypt"),
                    errdetail("An encrypted value is %zu bytes longer than its plaintext and "
                              "cannot exceed 1 GB; the plaintext has %zu bytes.",
                              colcrypt::kEnvelopeOverhead, plaintext.size)));
  const size_t size = plaintext.size + colcrypt::kEnvelopeOverhead;  // sealed_size()
  const KeydSettings settings = colcrypt::pg::prepare_key_access();
  bytea* result = static_cast<bytea*>(palloc(VARHDRSZ + size));
  SET_VARSIZE(result, VARHDRSZ + size);

  guarded(ValueOrigin::Stored, [&] {
    const std::string_view key_name(reinterpret_cast<const char*>(name.data), name.size);
    colcrypt::pg::encrypt_value(settings, key_name, payload, context, plaintext,
                                reinterpret_cast<uint8_t*>(VARDATA(result)));
  });
  PG_RETURN_BYTEA_P(result);
}

// The envelope argument and its validated header.
ByteView envelope_arg(FunctionCallInfo fcinfo, EnvelopeHeader& header) {
  const ByteView envelope = bytes_of(PG_GETARG_BYTEA_PP(0));
  guarded(ValueOrigin::Stored, [&] { header = colcrypt::parse_header(envelope); });
  return envelope;
}

// Decrypts argument 0 with the context in argument 1 into a new varlena.
struct varlena* decrypt_field(FunctionCallInfo fcinfo, const ByteView& envelope) {
  const ByteView context = context_arg(fcinfo, 1);
  const size_t size = envelope.size - colcrypt::kEnvelopeOverhead;  // opened_size()
  const KeydSettings settings = colcrypt::pg::prepare_key_access();
  struct varlena* result = static_cast<struct varlena*>(palloc(VARHDRSZ + size));
  SET_VARSIZE(result, VARHDRSZ + size);

  guarded(ValueOrigin::Stored, [&] {
    colcrypt::pg::decrypt_value(settings, envelope, context,
                                reinterpret_cast<uint8_t*>(VARDATA(result)));
  });
  return result;
}

}  // namespace

// encrypt_field(text, key_name text [, context text]) -> encrypted
Datum colcrypt_encrypt_text(PG_FUNCTION_ARGS) { return encrypt_field(fcinfo, PayloadType::Text); }

// encrypt_field(bytea, key_name text [, context text]) -> encrypted
Datum colcrypt_encrypt_bytea(PG_FUNCTION_ARGS) { return encrypt_field(fcinfo, PayloadType::Bytes); }

// decrypt_field(encrypted [, context text]) -> text
Datum colcrypt_decrypt_text(PG_FUNCTION_ARGS) {
  EnvelopeHeader header;
  const ByteView envelope = envelope_arg(fcinfo, header);
  if (header.payload != PayloadType::Text)
    ereport(ERROR,
            (errcode(ERRCODE_DATATYPE_MISMATCH), errmsg("colcrypt value holds bytea, not text"),
             errdetail("The value was encrypted from a bytea."),
             errhint("Use colcrypt.decrypt_field_bytea() to decrypt it.")));
  struct varlena* result = decrypt_field(fcinfo, envelope);

  // The value may come from a database with another encoding (a dump restored
  // elsewhere): text must be valid here. The error never shows the bytes.
  if (!pg_verify_mbstr(GetDatabaseEncoding(), VARDATA(result),
                       static_cast<int>(VARSIZE(result) - VARHDRSZ), true)) {
    guarded(ValueOrigin::Stored,
            [&] { colcrypt::secure_zero(VARDATA(result), VARSIZE(result) - VARHDRSZ); });
    pfree(result);
    ereport(ERROR,
            (errcode(ERRCODE_CHARACTER_NOT_IN_REPERTOIRE),
             errmsg("decrypted value is not valid in encoding \"%s\"", GetDatabaseEncodingName()),
             errhint("The value was encrypted in a database with another encoding; "
                     "decrypt it with colcrypt.decrypt_field_bytea() and convert_from().")));
  }
  PG_RETURN_TEXT_P(result);
}

// decrypt_field_bytea(encrypted [, context text]) -> bytea; any payload type.
Datum colcrypt_decrypt_bytea(PG_FUNCTION_ARGS) {
  EnvelopeHeader header;
  const ByteView envelope = envelope_arg(fcinfo, header);
  PG_RETURN_BYTEA_P(decrypt_field(fcinfo, envelope));
}

// key_id(encrypted) -> uuid, from the header alone.
Datum colcrypt_key_id(PG_FUNCTION_ARGS) {
  EnvelopeHeader header;
  envelope_arg(fcinfo, header);
  pg_uuid_t* uuid = static_cast<pg_uuid_t*>(palloc(sizeof(pg_uuid_t)));
  static_assert(sizeof(uuid->data) == colcrypt::kKeyIdSize, "key ids are UUIDs");
  std::memcpy(uuid->data, header.key_id.data(), colcrypt::kKeyIdSize);
  PG_RETURN_UUID_P(uuid);
}

// key_version(encrypted) -> integer, from the header alone.
Datum colcrypt_key_version(PG_FUNCTION_ARGS) {
  EnvelopeHeader header;
  envelope_arg(fcinfo, header);
  if (header.key_version > static_cast<uint32_t>(PG_INT32_MAX))
    ereport(ERROR, (errcode(ERRCODE_NUMERIC_VALUE_OUT_OF_RANGE),
                    errmsg("key version %u is out of range for type integer", header.key_version)));
  PG_RETURN_INT32(static_cast<int32>(header.key_version));
}

// key_name(encrypted) -> text: asks the key cache (and keyd on a miss).
Datum colcrypt_key_name(PG_FUNCTION_ARGS) {
  EnvelopeHeader header;
  envelope_arg(fcinfo, header);
  const KeydSettings settings = colcrypt::pg::prepare_key_access();
  char name[colcrypt::pg::kKeyNameCapacity];
  size_t length = 0;
  guarded(ValueOrigin::Stored, [&] { length = colcrypt::pg::key_name_of(settings, header, name); });
  PG_RETURN_TEXT_P(cstring_to_text_with_len(name, static_cast<int>(length)));
}
