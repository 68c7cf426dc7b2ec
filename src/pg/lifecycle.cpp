// Key lifecycle functions (issue 3; docs/rotation.md):
//   colcrypt.rewrap(value encrypted [, context text]) -> encrypted
//     re-seals a value under the primary version of its own key, inside the
//     backend: the plaintext lives only in a wiped C++ buffer of this call.
//     A value already under the primary version (or a newer one) comes back
//     unchanged, so running it twice never encrypts twice. Without a context
//     argument the context is the binding of the argument's key-bound column
//     (as decrypt_field), else empty.
//   colcrypt.rewrap_array(values encrypted[] [, context text]) -> encrypted[]
//     the same for every element, keeping dimensions, bounds and NULLs.
//   colcrypt.try_ciphertext(text) -> encrypted
//     the value of a "colcrypt:..." text form, NULL when the text is not one.
//   colcrypt._as_table_owner(rel regclass, command text) -> bigint
//     runs a command as the table's owner in a security-restricted operation
//     (rotation jobs' UPDATEs: the owner's code never runs as keyd's role).
//   colcrypt._column_context(typmod integer) -> text
//     the AAD context of a key-bound column type's values.
//   colcrypt.encrypt_derived(value text|bytea, key_name text, context text)
//     seals under a key derived with HKDF from the primary version for this
//     one context (algorithm 3 of docs/format.md): a tenant's or an
//     application's own key under one named key. decrypt_field opens it with
//     the same context; rotating the named key rotates every derived key.
//   colcrypt.rotate_key(name text) -> integer
//     asks colcrypt-keyd to rotate; keyd allows it only when started with
//     --sql-rotate (or when the database runs as an admin uid). Returns the
//     new primary version and drops this backend's cached primary.
//
// Same shape as functions.cpp: Postgres work, then the C++ part in guarded(),
// then Postgres work.

// postgres.h must come first: keep clang-format from sorting it.
// clang-format off
// Some server headers (spinlocks, via SPI) still use `register`, which C++17
// removed: accept it in them only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wregister"
extern "C" {
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_class.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "nodes/nodeFuncs.h"
#include "nodes/primnodes.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/acl.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/syscache.h"
}
#pragma GCC diagnostic pop
// clang-format on

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "client/client.hpp"
#include "core/envelope.hpp"
#include "core/secure_memory.hpp"
#include "pg/columns.hpp"
#include "pg/guard.hpp"
#include "pg/key_cache.hpp"
#include "pg/module.hpp"

using colcrypt::ByteView;
using colcrypt::EnvelopeHeader;
using colcrypt::pg::guarded;
using colcrypt::pg::KeydSettings;
using colcrypt::pg::ValueOrigin;

extern "C" {
PG_FUNCTION_INFO_V1(colcrypt_rewrap);
PG_FUNCTION_INFO_V1(colcrypt_rewrap_array);
PG_FUNCTION_INFO_V1(colcrypt_try_ciphertext);
PG_FUNCTION_INFO_V1(colcrypt_column_context);
PG_FUNCTION_INFO_V1(colcrypt_as_table_owner);
PG_FUNCTION_INFO_V1(colcrypt_rotate_key);
PG_FUNCTION_INFO_V1(colcrypt_encrypt_derived_text);
PG_FUNCTION_INFO_V1(colcrypt_encrypt_derived_bytea);
}

namespace {

ByteView bytes_of(const struct varlena* v) {
  return ByteView(reinterpret_cast<const uint8_t*>(VARDATA_ANY(v)), VARSIZE_ANY_EXHDR(v));
}

// The typmod of argument 0's expression when the planner knows it, else -1.
int32 first_argument_typmod(FunctionCallInfo fcinfo) {
  if (fcinfo->flinfo == nullptr || fcinfo->flinfo->fn_expr == nullptr) return -1;
  Node* expr = fcinfo->flinfo->fn_expr;
  if (!IsA(expr, FuncExpr)) return -1;
  List* args = reinterpret_cast<FuncExpr*>(expr)->args;
  if (list_length(args) < 1) return -1;
  return exprTypmod(static_cast<Node*>(linitial(args)));
}

}  // namespace

namespace {

// The context of rewrap's values: argument 1 when given, else the binding of
// argument 0's key-bound column type (as decrypt_field), else empty.
ByteView rewrap_context(FunctionCallInfo fcinfo, colcrypt::pg::ColumnKey& column) {
  if (PG_NARGS() > 1) return bytes_of(PG_GETARG_TEXT_PP(1));
  const int32 typmod = first_argument_typmod(fcinfo);
  if (typmod < 0) return ByteView();
  column = colcrypt::pg::column_key(typmod);
  return ByteView(reinterpret_cast<const uint8_t*>(column.context), column.context_size);
}

// One value re-sealed under the primary version of its own key; input itself
// when it already is under the primary (or a newer version).
struct varlena* rewrap_value(struct varlena* input, ByteView context,
                             const KeydSettings& settings) {
  const ByteView envelope = bytes_of(input);
  colcrypt::pg::reject_pending(envelope);
  EnvelopeHeader header;
  guarded(ValueOrigin::Stored, [&] { header = colcrypt::parse_header(envelope); });
  char name[colcrypt::pg::kKeyNameCapacity];
  size_t name_size = 0;
  uint32_t primary = 0;
  guarded(ValueOrigin::Stored, [&] {
    name_size = colcrypt::pg::key_name_of(settings, header, name);
    primary = colcrypt::pg::primary_version(settings, std::string_view(name, name_size));
  });
  if (!superuser()) {
    colcrypt::pg::check_key_privilege(name, name_size, colcrypt::pg::KeyPrivilege::Decrypt);
    colcrypt::pg::check_key_privilege(name, name_size, colcrypt::pg::KeyPrivilege::Encrypt);
  }
  if (header.key_version >= primary) return input;  // already current

  const size_t plain_size = envelope.size - colcrypt::kEnvelopeOverhead;
  bytea* result = static_cast<bytea*>(palloc(VARHDRSZ + envelope.size));
  SET_VARSIZE(result, VARHDRSZ + envelope.size);
  guarded(ValueOrigin::Stored, [&] {
    colcrypt::SecretBytes plaintext(plain_size);  // wiped when the lambda returns or throws
    colcrypt::pg::decrypt_value(settings, header, envelope, context, plaintext.data());
    // A derived-key value stays one, under the primary's key for its context.
    colcrypt::pg::encrypt_value(settings, std::string_view(name, name_size), header.payload,
                                context, plaintext.view(),
                                reinterpret_cast<uint8_t*>(VARDATA(result)), header.algorithm);
  });
  return result;
}

}  // namespace

extern "C" Datum colcrypt_rewrap(PG_FUNCTION_ARGS) {
  struct varlena* input = PG_GETARG_BYTEA_PP(0);
  colcrypt::pg::ColumnKey column;
  const ByteView context = rewrap_context(fcinfo, column);
  const KeydSettings settings = colcrypt::pg::prepare_key_access();
  PG_RETURN_POINTER(rewrap_value(input, context, settings));
}

// rewrap_array(encrypted[] [, context]): every element as rewrap, in place of the
// same dimensions and lower bounds; NULL elements stay NULL.
extern "C" Datum colcrypt_rewrap_array(PG_FUNCTION_ARGS) {
  ArrayType* array = PG_GETARG_ARRAYTYPE_P(0);
  colcrypt::pg::ColumnKey column;
  const ByteView context = rewrap_context(fcinfo, column);
  const Oid element_type = ARR_ELEMTYPE(array);
  int16 typlen;
  bool typbyval;
  char typalign;
  get_typlenbyvalalign(element_type, &typlen, &typbyval, &typalign);
  Datum* elements;
  bool* nulls;
  int count;
  deconstruct_array(array, element_type, typlen, typbyval, typalign, &elements, &nulls, &count);
  if (count == 0) PG_RETURN_ARRAYTYPE_P(array);
  const KeydSettings settings = colcrypt::pg::prepare_key_access();
  for (int i = 0; i < count; ++i) {
    if (nulls[i]) continue;
    elements[i] =
        PointerGetDatum(rewrap_value(PG_DETOAST_DATUM_PACKED(elements[i]), context, settings));
  }
  PG_RETURN_ARRAYTYPE_P(construct_md_array(elements, nulls, ARR_NDIM(array), ARR_DIMS(array),
                                           ARR_LBOUND(array), element_type, typlen, typbyval,
                                           typalign));
}

// try_ciphertext(text): the value of a "colcrypt:..." text form, or NULL
// when the text is not one (no error: JSON documents hold any strings).
extern "C" Datum colcrypt_try_ciphertext(PG_FUNCTION_ARGS) {
  text* input = PG_GETARG_TEXT_PP(0);
  const char* data = VARDATA_ANY(input);
  const size_t length = VARSIZE_ANY_EXHDR(input);
  if (!colcrypt::pg::claims_sealed(data, length)) PG_RETURN_NULL();
  const std::string_view text_form(data, length);
  size_t capacity = 0;
  guarded(ValueOrigin::Stored, [&] { capacity = colcrypt::decoded_size_bound(text_form.size()); });
  bytea* result = static_cast<bytea*>(palloc(VARHDRSZ + capacity));
  size_t size = 0;
  bool valid = false;
  guarded(ValueOrigin::Stored, [&] {
    try {
      uint8_t* out = reinterpret_cast<uint8_t*>(VARDATA(result));
      size = colcrypt::decode_text(text_form, out, capacity);
      colcrypt::parse_header(ByteView(out, size));
      valid = true;
    } catch (const colcrypt::Error& e) {
      if (e.code() != colcrypt::Errc::MalformedValue) throw;
    }
  });
  if (!valid) PG_RETURN_NULL();
  SET_VARSIZE(result, VARHDRSZ + size);
  PG_RETURN_BYTEA_P(result);
}

// _as_table_owner(rel regclass, command text) -> bigint: runs command (an
// UPDATE of rel, say) through SPI as rel's owner inside a security-restricted
// operation, as REFRESH MATERIALIZED VIEW and VACUUM run the owner's code:
// the owner's triggers, index expressions and policy functions run as the
// owner, and cannot SET ROLE (or RESET ROLE back to the caller), change the
// session's settings for later, or create temporary objects. Constraints
// and constraint triggers are made immediate for the rest of the caller's
// transaction (deferred triggers cannot be queued in such an operation), so
// they fire, as the owner, before it returns; row-level security applies (as
// to the owner); search_path is the default one. Returns the rows processed. The
// caller must have the privileges of the owner's role (a superuser does).
extern "C" Datum colcrypt_as_table_owner(PG_FUNCTION_ARGS) {
  const Oid relid = PG_GETARG_OID(0);
  const char* command = text_to_cstring(PG_GETARG_TEXT_PP(1));
  HeapTuple tuple = SearchSysCache1(RELOID, ObjectIdGetDatum(relid));
  if (!HeapTupleIsValid(tuple))
    ereport(ERROR, (errcode(ERRCODE_UNDEFINED_TABLE),
                    errmsg("relation with OID %u does not exist", relid)));
  const Oid owner = reinterpret_cast<Form_pg_class>(GETSTRUCT(tuple))->relowner;
  ReleaseSysCache(tuple);
  if (!has_privs_of_role(GetUserId(), owner))
    ereport(ERROR, (errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
                    errmsg("only a member of the owner of table \"%s\" may run commands as it",
                           get_rel_name(relid))));
  Oid saved_user;
  int saved_context;
  GetUserIdAndSecContext(&saved_user, &saved_context);
  // On error the (sub)transaction's abort restores the user, the security
  // context and the settings.
  SetUserIdAndSecContext(
      owner, saved_context | SECURITY_LOCAL_USERID_CHANGE | SECURITY_RESTRICTED_OPERATION);
  const int nest_level = NewGUCNestLevel();
  (void)set_config_option("row_security", "on", PGC_USERSET, PGC_S_SESSION, GUC_ACTION_SAVE, true,
                          0, false);
  (void)set_config_option("search_path", "\"$user\", public", PGC_USERSET, PGC_S_SESSION,
                          GUC_ACTION_SAVE, true, 0, false);
  if (SPI_connect() != SPI_OK_CONNECT)
    ereport(ERROR, (errcode(ERRCODE_INTERNAL_ERROR), errmsg("SPI_connect failed")));
  // Postgres refuses to queue deferred triggers in a security-restricted
  // operation: make every constraint (and constraint trigger) of this
  // transaction immediate first, so they fire at the end of the command.
  if (SPI_execute("SET CONSTRAINTS ALL IMMEDIATE", false, 0) < 0 ||
      SPI_execute(command, false, 0) < 0)
    ereport(ERROR, (errcode(ERRCODE_INTERNAL_ERROR), errmsg("SPI_execute failed")));
  const uint64 processed = SPI_processed;
  SPI_finish();
  AtEOXact_GUC(false, nest_level);
  SetUserIdAndSecContext(saved_user, saved_context);
  PG_RETURN_INT64(static_cast<int64>(processed));
}

// _column_context(typmod): the AAD context of a key-bound column type's values.
extern "C" Datum colcrypt_column_context(PG_FUNCTION_ARGS) {
  const int32 typmod = PG_GETARG_INT32(0);
  if (typmod < 0) PG_RETURN_NULL();
  const colcrypt::pg::ColumnKey column = colcrypt::pg::column_key(typmod);
  PG_RETURN_TEXT_P(cstring_to_text_with_len(column.context, static_cast<int>(column.context_size)));
}

namespace {

Datum encrypt_derived(FunctionCallInfo fcinfo, colcrypt::PayloadType payload) {
  const ByteView plaintext = bytes_of(PG_GETARG_VARLENA_PP(0));
  const ByteView name = bytes_of(PG_GETARG_TEXT_PP(1));
  const ByteView context = bytes_of(PG_GETARG_TEXT_PP(2));
  if (plaintext.size > MaxAllocSize - VARHDRSZ - colcrypt::kEnvelopeOverhead)
    ereport(ERROR, (errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED), errmsg("value too large to encrypt")));
  if (context.size == 0)
    ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE),
                    errmsg("a derived key needs a non-empty context"),
                    errhint("Use colcrypt.encrypt_field() for values without a context.")));
  const size_t size = plaintext.size + colcrypt::kEnvelopeOverhead;
  colcrypt::pg::check_key_privilege(reinterpret_cast<const char*>(name.data), name.size,
                                    colcrypt::pg::KeyPrivilege::Encrypt);
  const KeydSettings settings = colcrypt::pg::prepare_key_access();
  bytea* result = static_cast<bytea*>(palloc(VARHDRSZ + size));
  SET_VARSIZE(result, VARHDRSZ + size);
  guarded(ValueOrigin::Stored, [&] {
    colcrypt::pg::encrypt_value(
        settings, std::string_view(reinterpret_cast<const char*>(name.data), name.size), payload,
        context, plaintext, reinterpret_cast<uint8_t*>(VARDATA(result)),
        colcrypt::Algorithm::Aes256GcmDerived);
  });
  PG_RETURN_BYTEA_P(result);
}

}  // namespace

extern "C" Datum colcrypt_encrypt_derived_text(PG_FUNCTION_ARGS) {
  return encrypt_derived(fcinfo, colcrypt::PayloadType::Text);
}

extern "C" Datum colcrypt_encrypt_derived_bytea(PG_FUNCTION_ARGS) {
  return encrypt_derived(fcinfo, colcrypt::PayloadType::Bytes);
}

extern "C" Datum colcrypt_rotate_key(PG_FUNCTION_ARGS) {
  const ByteView name = bytes_of(PG_GETARG_TEXT_PP(0));
  const KeydSettings settings = colcrypt::pg::prepare_key_access();
  int64_t version = -1;
  guarded(ValueOrigin::Stored, [&] {
    const std::string key_name(reinterpret_cast<const char*>(name.data), name.size);
    if (!colcrypt::valid_key_name(key_name))
      throw colcrypt::pg::SqlError(colcrypt::Errc::InvalidArgument, "invalid colcrypt key name");
    std::string reply;
    try {
      reply = colcrypt::client::Client(colcrypt::pg::client_options(settings))
                  .admin("{\"op\":\"rotate\",\"name\":\"" + key_name + "\"}");
    } catch (const colcrypt::Error& e) {
      if (e.code() == colcrypt::Errc::PermissionDenied)
        throw colcrypt::pg::SqlError(
            colcrypt::Errc::PermissionDenied,
            "colcrypt-keyd refused to rotate key \"" + key_name + "\"", e.what(),
            "Start colcrypt-keyd with --sql-rotate to allow rotation from SQL.");
      if (e.code() == colcrypt::Errc::KeyNotFound)
        throw colcrypt::pg::SqlError(colcrypt::Errc::KeyNotFound,
                                     "colcrypt key \"" + key_name + "\" not found");
      throw colcrypt::pg::SqlError(
          e.code(), "colcrypt-keyd could not rotate key \"" + key_name + "\"", e.what());
    }
    // The reply is keyd's key object; only its primary_version is needed.
    const std::string field = "\"primary_version\":";
    const size_t at = reply.find(field);
    if (at == std::string::npos)
      throw colcrypt::pg::SqlError(colcrypt::Errc::ProtocolError,
                                   "invalid reply from colcrypt-keyd");
    version = std::strtoll(reply.c_str() + at + field.size(), nullptr, 10);
    // This backend encrypts under the new version from now on.
    colcrypt::pg::clear_key_cache();
  });
  PG_RETURN_INT32(static_cast<int32>(version));
}
