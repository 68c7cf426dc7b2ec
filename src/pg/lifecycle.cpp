// Key lifecycle functions (issue 3; docs/rotation.md):
//   colcrypt.rewrap(value encrypted [, context text]) -> encrypted
//     re-seals a value under the primary version of its own key, inside the
//     backend: the plaintext lives only in a wiped C++ buffer of this call.
//     A value already under the primary version (or a newer one) comes back
//     unchanged, so running it twice never encrypts twice. Without a context
//     argument the context is the binding of the argument's key-bound column
//     (as decrypt_field), else empty.
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
extern "C" {
#include "postgres.h"

#include "fmgr.h"
#include "miscadmin.h"
#include "nodes/nodeFuncs.h"
#include "nodes/primnodes.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
}
// clang-format on

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "core/envelope.hpp"
#include "core/secure_memory.hpp"
#include "keyd/client.hpp"
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

extern "C" Datum colcrypt_rewrap(PG_FUNCTION_ARGS) {
  struct varlena* input = PG_GETARG_BYTEA_PP(0);
  const ByteView envelope = bytes_of(input);
  colcrypt::pg::reject_pending(envelope);
  ByteView context;
  colcrypt::pg::ColumnKey column;
  if (PG_NARGS() > 1) {
    context = bytes_of(PG_GETARG_TEXT_PP(1));
  } else {
    const int32 typmod = first_argument_typmod(fcinfo);
    if (typmod >= 0) {
      column = colcrypt::pg::column_key(typmod);
      context = ByteView(reinterpret_cast<const uint8_t*>(column.context), column.context_size);
    }
  }
  EnvelopeHeader header;
  guarded(ValueOrigin::Stored, [&] { header = colcrypt::parse_header(envelope); });
  const KeydSettings settings = colcrypt::pg::prepare_key_access();

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
  if (header.key_version >= primary) PG_RETURN_POINTER(input);  // already current

  const size_t plain_size = envelope.size - colcrypt::kEnvelopeOverhead;
  bytea* result = static_cast<bytea*>(palloc(VARHDRSZ + envelope.size));
  SET_VARSIZE(result, VARHDRSZ + envelope.size);
  guarded(ValueOrigin::Stored, [&] {
    colcrypt::SecretBytes plaintext(plain_size);  // wiped when the lambda returns or throws
    colcrypt::pg::decrypt_value(settings, envelope, context, plaintext.data());
    // A derived-key value stays one, under the primary's key for its context.
    colcrypt::pg::encrypt_value(settings, std::string_view(name, name_size), header.payload,
                                context, plaintext.view(),
                                reinterpret_cast<uint8_t*>(VARDATA(result)), header.algorithm);
  });
  PG_RETURN_BYTEA_P(result);
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
    colcrypt::keyd::ClientOptions options;
    options.socket_path = settings.socket_path;
    options.timeout_ms = settings.timeout_ms;
    options.interrupted = settings.interrupted;
    std::string reply;
    try {
      reply = colcrypt::keyd::Client(std::move(options))
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
