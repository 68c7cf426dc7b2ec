// The SQL functions of the extension: encrypt_field, decrypt_field,
// decrypt_field_bytea, the inspectors key_id, key_version and key_name,
// ciphertext and blind_index.
//
// Every use of a key checks the caller's privilege on it (columns.hpp):
// encrypt for encrypt_field, decrypt for the decrypting functions (the key's
// name comes from the key cache), blind_index for blind_index.
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
#include "miscadmin.h"
#include "nodes/nodeFuncs.h"
#include "nodes/primnodes.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/uuid.h"
}
// clang-format on

#include <cstdint>
#include <cstring>
#include <string_view>

#include "core/envelope.hpp"
#include "core/error.hpp"
#include "core/secure_memory.hpp"
#include "pg/columns.hpp"
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
PG_FUNCTION_INFO_V1(colcrypt_ciphertext);
PG_FUNCTION_INFO_V1(colcrypt_blind_index);
PG_FUNCTION_INFO_V1(colcrypt_encrypt_deterministic);
PG_FUNCTION_INFO_V1(colcrypt_decrypt_deterministic);
PG_FUNCTION_INFO_V1(colcrypt_verify_sealed);
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

  colcrypt::pg::check_sealable_size(plaintext.size);
  const size_t size = plaintext.size + colcrypt::kEnvelopeOverhead;  // sealed_size()
  colcrypt::pg::check_key_privilege(reinterpret_cast<const char*>(name.data), name.size,
                                    colcrypt::pg::KeyPrivilege::Encrypt);
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
  colcrypt::pg::reject_pending(envelope);
  guarded(ValueOrigin::Stored, [&] { header = colcrypt::parse_header(envelope); });
  return envelope;
}

// The type modifier of the expression passed as argument argno, when the
// planner still knows it (a column, a view's column, a subquery's output): -1
// otherwise (a function result, a PL/pgSQL variable without one).
int32 argument_typmod(FunctionCallInfo fcinfo, int argno) {
  if (fcinfo->flinfo == nullptr || fcinfo->flinfo->fn_expr == nullptr) return -1;
  Node* expr = fcinfo->flinfo->fn_expr;
  List* args = NIL;
  if (IsA(expr, FuncExpr))
    args = reinterpret_cast<FuncExpr*>(expr)->args;
  else if (IsA(expr, OpExpr))
    args = reinterpret_cast<OpExpr*>(expr)->args;
  if (argno >= list_length(args)) return -1;
  return exprTypmod(static_cast<Node*>(list_nth(args, argno)));
}

// Decrypts argument 0 into a new varlena. The context (AAD) is argument 1 when
// given; otherwise the binding of the argument's key-bound column type, or
// none for a value of a column without a key.
struct varlena* decrypt_field(FunctionCallInfo fcinfo, const EnvelopeHeader& header,
                              const ByteView& envelope) {
  ByteView context = context_arg(fcinfo, 1);
  if (PG_NARGS() < 2) {
    // The argument's type does not change between calls of one expression:
    // resolve its binding once and keep a copy in fn_extra.
    struct Binding {
      bool bound;
      colcrypt::pg::ColumnKey column;
    };
    Binding* binding =
        fcinfo->flinfo != nullptr ? static_cast<Binding*>(fcinfo->flinfo->fn_extra) : nullptr;
    if (binding == nullptr) {
      MemoryContext cxt =
          fcinfo->flinfo != nullptr ? fcinfo->flinfo->fn_mcxt : CurrentMemoryContext;
      binding = static_cast<Binding*>(MemoryContextAllocZero(cxt, sizeof(Binding)));
      const int32 typmod = argument_typmod(fcinfo, 0);
      if (typmod >= 0) {
        binding->column = colcrypt::pg::column_key(typmod);
        binding->bound = true;
      }
      if (fcinfo->flinfo != nullptr) fcinfo->flinfo->fn_extra = binding;
    }
    if (binding->bound)
      context = ByteView(reinterpret_cast<const uint8_t*>(binding->column.context),
                         binding->column.context_size);
  }
  const size_t size = envelope.size - colcrypt::kEnvelopeOverhead;  // opened_size()
  const KeydSettings settings = colcrypt::pg::prepare_key_access();
  if (!superuser()) {  // superusers pass every check: skip the name lookup
    char name[colcrypt::pg::kKeyNameCapacity];
    size_t name_size = 0;
    guarded(ValueOrigin::Stored,
            [&] { name_size = colcrypt::pg::key_name_of(settings, header, name); });
    colcrypt::pg::check_key_privilege(name, name_size, colcrypt::pg::KeyPrivilege::Decrypt);
  }
  struct varlena* result = static_cast<struct varlena*>(palloc(VARHDRSZ + size));
  SET_VARSIZE(result, VARHDRSZ + size);

  guarded(ValueOrigin::Stored, [&] {
    colcrypt::pg::decrypt_value(settings, header, envelope, context,
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
  struct varlena* result = decrypt_field(fcinfo, header, envelope);

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
  PG_RETURN_BYTEA_P(decrypt_field(fcinfo, header, envelope));
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

// ciphertext(encrypted) -> text: the text form ("colcrypt:" + base64), what
// the output function prints; the explicit cast to text decrypts instead.
Datum colcrypt_ciphertext(PG_FUNCTION_ARGS) {
  EnvelopeHeader header;
  const ByteView envelope = envelope_arg(fcinfo, header);
  size_t length = 0;
  guarded(ValueOrigin::Stored, [&] { length = colcrypt::text_size(envelope.size); });
  if (length > MaxAllocSize - VARHDRSZ)
    ereport(ERROR, (errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
                    errmsg("colcrypt.encrypted value too large for its text form")));
  text* result = static_cast<text*>(palloc(VARHDRSZ + length));
  SET_VARSIZE(result, VARHDRSZ + length);
  guarded(ValueOrigin::Stored, [&] { colcrypt::encode_text(envelope, VARDATA(result)); });
  PG_RETURN_TEXT_P(result);
}

// blind_index(value text, key_name text [, context text]) -> bytea: 32 bytes
// of HMAC-SHA256 over u32be(length of context) || context || the value in
// Unicode NFC (in a UTF-8 database), under a key derived from the named key
// for this purpose only (key_cache.hpp).
Datum colcrypt_blind_index(PG_FUNCTION_ARGS) {
  text* value = PG_GETARG_TEXT_PP(0);
  if (GetDatabaseEncoding() == PG_UTF8)
    value = DatumGetTextPP(DirectFunctionCall2(unicode_normalize_func, PointerGetDatum(value),
                                               CStringGetTextDatum("NFC")));
  const ByteView name = bytes_of(PG_GETARG_TEXT_PP(1));
  const ByteView context = context_arg(fcinfo, 2);
  const ByteView plain = bytes_of(value);
  colcrypt::pg::check_key_privilege(reinterpret_cast<const char*>(name.data), name.size,
                                    colcrypt::pg::KeyPrivilege::BlindIndex);
  const size_t size = 4 + context.size + plain.size;
  uint8_t* data = static_cast<uint8_t*>(palloc(size));
  data[0] = static_cast<uint8_t>(context.size >> 24);
  data[1] = static_cast<uint8_t>(context.size >> 16);
  data[2] = static_cast<uint8_t>(context.size >> 8);
  data[3] = static_cast<uint8_t>(context.size);
  if (context.size > 0) std::memcpy(data + 4, context.data, context.size);
  if (plain.size > 0) std::memcpy(data + 4 + context.size, plain.data, plain.size);
  const KeydSettings settings = colcrypt::pg::prepare_key_access();
  bytea* result = static_cast<bytea*>(palloc(VARHDRSZ + colcrypt::pg::kBlindIndexSize));
  SET_VARSIZE(result, VARHDRSZ + colcrypt::pg::kBlindIndexSize);
  uint8_t mac[colcrypt::pg::kBlindIndexSize];
  PG_TRY();
  {
    guarded(ValueOrigin::Stored, [&] {
      const std::string_view key_name(reinterpret_cast<const char*>(name.data), name.size);
      colcrypt::pg::blind_index(settings, key_name, ByteView(data, size), mac);
    });
  }
  PG_FINALLY();
  { explicit_bzero(data, size); }
  PG_END_TRY();
  std::memcpy(VARDATA(result), mac, sizeof mac);
  PG_RETURN_BYTEA_P(result);
}

// encrypt_deterministic(value text, key_name text [, context text]) -> bytea:
// AES-256-SIV (key_cache.hpp); equal plaintexts under one key and context give
// equal values, so they can be compared, joined and indexed.
Datum colcrypt_encrypt_deterministic(PG_FUNCTION_ARGS) {
  const ByteView plaintext = bytes_of(PG_GETARG_TEXT_PP(0));
  const ByteView name = bytes_of(PG_GETARG_TEXT_PP(1));
  const ByteView context = context_arg(fcinfo, 2);
  if (plaintext.size > MaxAllocSize - VARHDRSZ - colcrypt::pg::kDeterministicOverhead)
    ereport(ERROR, (errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED), errmsg("value too large to encrypt")));
  colcrypt::pg::check_key_privilege(reinterpret_cast<const char*>(name.data), name.size,
                                    colcrypt::pg::KeyPrivilege::Encrypt);
  const size_t size = plaintext.size + colcrypt::pg::kDeterministicOverhead;
  const KeydSettings settings = colcrypt::pg::prepare_key_access();
  bytea* result = static_cast<bytea*>(palloc(VARHDRSZ + size));
  SET_VARSIZE(result, VARHDRSZ + size);
  guarded(ValueOrigin::Stored, [&] {
    const std::string_view key_name(reinterpret_cast<const char*>(name.data), name.size);
    colcrypt::pg::encrypt_deterministic(settings, key_name, PayloadType::Text, context, plaintext,
                                        reinterpret_cast<uint8_t*>(VARDATA(result)));
  });
  PG_RETURN_BYTEA_P(result);
}

// decrypt_deterministic(value bytea [, context text]) -> text
Datum colcrypt_decrypt_deterministic(PG_FUNCTION_ARGS) {
  const ByteView value = bytes_of(PG_GETARG_BYTEA_PP(0));
  const ByteView context = context_arg(fcinfo, 1);
  guarded(ValueOrigin::Stored, [&] { colcrypt::pg::check_deterministic(value); });
  if (value.data[2] != static_cast<uint8_t>(PayloadType::Text))
    ereport(ERROR,
            (errcode(ERRCODE_DATATYPE_MISMATCH), errmsg("colcrypt value holds bytea, not text")));
  const KeydSettings settings = colcrypt::pg::prepare_key_access();
  if (!superuser()) {
    char name[64];
    size_t name_size = 0;
    guarded(ValueOrigin::Stored,
            [&] { name_size = colcrypt::pg::deterministic_key_name(settings, value, name); });
    colcrypt::pg::check_key_privilege(name, name_size, colcrypt::pg::KeyPrivilege::Decrypt);
  }
  const size_t size = value.size - colcrypt::pg::kDeterministicOverhead;
  text* result = static_cast<text*>(palloc(VARHDRSZ + size));
  SET_VARSIZE(result, VARHDRSZ + size);
  guarded(ValueOrigin::Stored, [&] {
    colcrypt::pg::decrypt_deterministic(settings, value, context,
                                        reinterpret_cast<uint8_t*>(VARDATA(result)));
  });
  if (!pg_verify_mbstr(GetDatabaseEncoding(), VARDATA(result), static_cast<int>(size), true)) {
    explicit_bzero(VARDATA(result), size);
    ereport(ERROR,
            (errcode(ERRCODE_CHARACTER_NOT_IN_REPERTOIRE),
             errmsg("decrypted value is not valid in encoding \"%s\"", GetDatabaseEncodingName())));
  }
  PG_RETURN_TEXT_P(result);
}

// _verify_sealed(value encrypted, key_name text, context text, path text):
// raises 22023 unless the value is under key_name and opens with context.
// encrypt_json keeps a value already encrypted at a path only after this
// check, so that a client cannot plant a ciphertext copied from another
// path, key or row. Needs the encrypt privilege only: nothing is returned.
Datum colcrypt_verify_sealed(PG_FUNCTION_ARGS) {
  EnvelopeHeader header;
  const ByteView envelope = envelope_arg(fcinfo, header);
  const ByteView name = bytes_of(PG_GETARG_TEXT_PP(1));
  const ByteView context = bytes_of(PG_GETARG_TEXT_PP(2));
  const char* path = text_to_cstring(PG_GETARG_TEXT_PP(3));
  colcrypt::pg::check_key_privilege(reinterpret_cast<const char*>(name.data), name.size,
                                    colcrypt::pg::KeyPrivilege::Encrypt);
  const KeydSettings settings = colcrypt::pg::prepare_key_access();
  const size_t size = envelope.size - colcrypt::kEnvelopeOverhead;  // opened_size()
  uint8_t* scratch = static_cast<uint8_t*>(palloc(size + 1));
  bool same_key = false;
  bool opens = false;
  guarded(ValueOrigin::Stored, [&] {
    char value_key[colcrypt::pg::kKeyNameCapacity];
    const size_t n = colcrypt::pg::key_name_of(settings, header, value_key);
    same_key = std::string_view(value_key, n) ==
               std::string_view(reinterpret_cast<const char*>(name.data), name.size);
    if (!same_key) return;
    try {
      colcrypt::pg::decrypt_value(settings, header, envelope, context, scratch);
      opens = true;
    } catch (const colcrypt::Error& e) {
      if (e.code() != colcrypt::Errc::DecryptionFailed) throw;
    }
    colcrypt::secure_zero(scratch, size);
  });
  pfree(scratch);
  if (!same_key || !opens)
    ereport(ERROR,
            (errcode(ERRCODE_INVALID_PARAMETER_VALUE),
             errmsg("the encrypted value at JSON path \"%s\" was not encrypted for it", path),
             errdetail(!same_key ? "It is under another key than the one given."
                                 : "It was encrypted for another path or row binding (copied "
                                   "from elsewhere)."),
             errhint("Put the plaintext there and encrypt the document again.")));
  PG_RETURN_VOID();
}
