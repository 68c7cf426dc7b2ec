// Key-bound columns: the type modifier of colcrypt.encrypted('key_name'
// [, 'binding']) and its catalog colcrypt.column_keys, and the casts that seal
// plaintext under a column's key or accept a value sealed for the column.
// Where the rest lives: key privileges in key_privileges.cpp, the sealed
// check in sealed.cpp, the hooks that guard writes in write_hooks.cpp, the
// DDL event triggers in ddl_triggers.cpp. docs/columns.md describes the design.
//
// Catalog access (colcrypt.column_keys, colcrypt.key_grants) runs through SPI
// as the catalog's owner with search_path pinned to pg_catalog, so that no
// caller needs privileges on the catalogs and no caller's search_path can
// redirect an operator; the queries qualify every name anyway.

// postgres.h must come first: keep clang-format from sorting it.
// clang-format off
// Some server headers (spinlocks, via SPI) still use `register`, which C++17
// removed: accept it in them only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wregister"
extern "C" {
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/lsyscache.h"
#include "utils/syscache.h"
}
#pragma GCC diagnostic pop
// clang-format on

#include "pg/columns.hpp"

#include <cstdio>
#include <cstring>
#include <string_view>

#include "core/envelope.hpp"
#include "core/kdf.hpp"
#include "pg/columns_internal.hpp"
#include "pg/guard.hpp"
#include "pg/module.hpp"
#include "pg/pending.hpp"

using colcrypt::ByteView;
using colcrypt::pg::as_catalog_owner;
using colcrypt::pg::bytes_of;
using colcrypt::pg::catalog_relid;
using colcrypt::pg::ColumnKey;
using colcrypt::pg::guarded;
using colcrypt::pg::ValueOrigin;

extern "C" {
PG_FUNCTION_INFO_V1(colcrypt_encrypted_typmod_in);
PG_FUNCTION_INFO_V1(colcrypt_encrypted_typmod_out);
PG_FUNCTION_INFO_V1(colcrypt_encrypted_coerce);
PG_FUNCTION_INFO_V1(colcrypt_text_to_encrypted);
PG_FUNCTION_INFO_V1(colcrypt_require_sealed);
}

namespace {

constexpr char kContextPrefix[] = "colcrypt.column:";

bool valid_name(const char* s) {
  bool ok = false;
  guarded(ValueOrigin::Stored, [&] { ok = colcrypt::valid_key_name(s); });
  return ok;
}

// ---------------------------------------------------------------- typmods

// The typmod of (key, binding): 31 bits of HMAC-SHA256 over both, so that a
// dump restored elsewhere, or pg_upgrade, gets the same number.
int32 typmod_of(const char* key, const char* binding) {
  int32 typmod = 0;
  guarded(ValueOrigin::Stored, [&] {
    const size_t kl = std::strlen(key);
    const size_t bl = std::strlen(binding);
    uint8_t data[2 * 64 + 1];
    std::memcpy(data, key, kl);
    data[kl] = 0;
    std::memcpy(data + kl + 1, binding, bl);
    const auto mac =
        colcrypt::hmac_sha256(ByteView::of("colcrypt column key"), ByteView(data, kl + 1 + bl));
    const uint32_t v = (uint32_t{mac[0]} << 24) | (uint32_t{mac[1]} << 16) |
                       (uint32_t{mac[2]} << 8) | uint32_t{mac[3]};
    typmod = static_cast<int32>(v & 0x7fffffffu);
  });
  return typmod;
}

// Per backend: typmod -> entry. The mapping is a function of (key, binding),
// so an entry never goes stale.
constexpr int kColumnCacheSize = 64;
ColumnKey column_cache[kColumnCacheSize];
int column_cache_used = 0;
int column_cache_next = 0;

void fill_entry(ColumnKey& e, int32 typmod, const char* key, const char* binding) {
  e.typmod = typmod;
  strlcpy(e.key_name, key, sizeof e.key_name);
  strlcpy(e.binding, binding, sizeof e.binding);
  e.context_size =
      static_cast<size_t>(snprintf(e.context, sizeof e.context, "%s%s", kContextPrefix, binding));
}

const ColumnKey* cached_column(int32 typmod) {
  for (int i = 0; i < column_cache_used; ++i)
    if (column_cache[i].typmod == typmod) return &column_cache[i];
  return nullptr;
}

const ColumnKey& remember_column(int32 typmod, const char* key, const char* binding) {
  ColumnKey* slot;
  if (column_cache_used < kColumnCacheSize) {
    slot = &column_cache[column_cache_used++];
  } else {
    slot = &column_cache[column_cache_next];
    column_cache_next = (column_cache_next + 1) % kColumnCacheSize;
  }
  fill_entry(*slot, typmod, key, binding);
  return *slot;
}

// Reads the catalog entry of typmod; false when there is none. latest: see
// this transaction's own inserts (a new snapshot; not in parallel mode).
bool lookup_column_key(int32 typmod, char (&key)[64], char (&binding)[64], bool latest = false) {
  bool found = false;
  as_catalog_owner(catalog_relid("column_keys"), [&] {
    Oid types[1] = {INT4OID};
    Datum values[1] = {Int32GetDatum(typmod)};
    if (SPI_execute_with_args("SELECT key_name, binding FROM colcrypt.column_keys "
                              "WHERE id OPERATOR(pg_catalog.=) $1",
                              1, types, values, nullptr, !latest, 1) != SPI_OK_SELECT)
      elog(ERROR, "SPI_execute_with_args failed");
    if (SPI_processed == 1) {
      found = true;
      strlcpy(key, SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1), sizeof key);
      strlcpy(binding, SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2),
              sizeof binding);
    }
  });
  return found;
}

void register_column_key(int32 typmod, const char* key, const char* binding) {
  char found_key[64];
  char found_binding[64];
  if (lookup_column_key(typmod, found_key, found_binding, true)) {
    if (std::strcmp(found_key, key) == 0 && std::strcmp(found_binding, binding) == 0) return;
    ereport(ERROR,
            (errcode(ERRCODE_DUPLICATE_OBJECT),
             errmsg("colcrypt binding \"%s\" of key \"%s\" collides with another column binding",
                    binding, key),
             errhint("Give the column another binding: colcrypt.encrypted('%s', 'other_label').",
                     key)));
  }
  as_catalog_owner(catalog_relid("column_keys"), [&] {
    Oid types[3] = {INT4OID, TEXTOID, TEXTOID};
    Datum values[3] = {Int32GetDatum(typmod), CStringGetTextDatum(key),
                       CStringGetTextDatum(binding)};
    if (SPI_execute_with_args("INSERT INTO colcrypt.column_keys (id, key_name, binding) "
                              "VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                              3, types, values, nullptr, false, 0) != SPI_OK_INSERT)
      elog(ERROR, "SPI_execute_with_args failed");
  });
  // A concurrent insert of another pair with the same id: refuse.
  if (!lookup_column_key(typmod, found_key, found_binding, true) ||
      std::strcmp(found_key, key) != 0 || std::strcmp(found_binding, binding) != 0)
    ereport(ERROR, (errcode(ERRCODE_DUPLICATE_OBJECT),
                    errmsg("colcrypt binding \"%s\" of key \"%s\" collides with another column "
                           "binding",
                           binding, key)));
}

}  // namespace

namespace colcrypt::pg {

Oid colcrypt_namespace(bool missing_ok) { return get_namespace_oid("colcrypt", missing_ok); }

Oid catalog_relid(const char* name) {
  const Oid relid = get_relname_relid(name, colcrypt_namespace(false));
  if (!OidIsValid(relid))
    ereport(
        ERROR,
        (errcode(ERRCODE_UNDEFINED_TABLE), errmsg("catalog colcrypt.%s is missing", name),
         errhint("Reinstall the extension: DROP EXTENSION colcrypt; CREATE EXTENSION colcrypt;")));
  return relid;
}

// Runs body (which uses SPI) as the owner of the catalog relid, with
// search_path = pg_catalog, pg_temp. Restores both on success and on error.
void run_as_catalog_owner(Oid relid, void (*body)(void*), void* context) {
  HeapTuple tuple = SearchSysCache1(RELOID, ObjectIdGetDatum(relid));
  if (!HeapTupleIsValid(tuple)) elog(ERROR, "cache lookup failed for relation %u", relid);
  const Oid owner = reinterpret_cast<Form_pg_class>(GETSTRUCT(tuple))->relowner;
  ReleaseSysCache(tuple);

  Oid saved_user;
  int saved_context;
  GetUserIdAndSecContext(&saved_user, &saved_context);
  const int nest = NewGUCNestLevel();
  SetUserIdAndSecContext(
      owner, saved_context | SECURITY_LOCAL_USERID_CHANGE | SECURITY_RESTRICTED_OPERATION);
  PG_TRY();
  {
    (void)set_config_option("search_path", "pg_catalog, pg_temp", PGC_USERSET, PGC_S_SESSION,
                            GUC_ACTION_SAVE, true, 0, false);
    if (SPI_connect() != SPI_OK_CONNECT) elog(ERROR, "SPI_connect failed");
    body(context);
    SPI_finish();
  }
  PG_FINALLY();
  { SetUserIdAndSecContext(saved_user, saved_context); }
  PG_END_TRY();
  AtEOXact_GUC(true, nest);
}

const ColumnKey& column_key(int32_t typmod) {
  if (const ColumnKey* hit = cached_column(typmod)) return *hit;
  char key[64];
  char binding[64];
  if (!lookup_column_key(typmod, key, binding))
    ereport(ERROR, (errcode(ERRCODE_UNDEFINED_OBJECT),
                    errmsg("colcrypt.column_keys has no entry for type modifier %d", typmod),
                    errhint("The entry is made when a column is declared as "
                            "colcrypt.encrypted('key_name'); do not delete entries in use.")));
  return remember_column(typmod, key, binding);
}

void reject_pending(ByteView value) {
  if (!is_pending(value)) return;
  ereport(ERROR,
          (errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
           errmsg("plaintext given as colcrypt.encrypted was not encrypted"),
           errdetail("Text that is not a sealed value (\"colcrypt:...\") becomes a "
                     "colcrypt.encrypted value only when it is stored in a key-bound column."),
           errhint("Declare the column as colcrypt.encrypted('key_name'), or use "
                   "colcrypt.encrypt_field(value, 'key_name').")));
}

bool claims_sealed(const char* text, size_t size) {
  size_t i = 0;
  while (i < size && (text[i] == ' ' || text[i] == '\t' || text[i] == '\n' || text[i] == '\r' ||
                      text[i] == '\f' || text[i] == '\v'))
    ++i;
  const std::string_view prefix = colcrypt::kTextPrefix;
  return size - i >= prefix.size() && pg_strncasecmp(text + i, prefix.data(), prefix.size()) == 0;
}

struct varlena* seal_for_column(int32_t typmod, ByteView plaintext) {
  const ColumnKey column = column_key(typmod);
  check_key_privilege(column.key_name, std::strlen(column.key_name), KeyPrivilege::Encrypt);
  check_sealable_size(plaintext.size);
  const size_t size = plaintext.size + colcrypt::kEnvelopeOverhead;
  const KeydSettings settings = prepare_key_access();
  struct varlena* result = static_cast<struct varlena*>(palloc(VARHDRSZ + size));
  SET_VARSIZE(result, VARHDRSZ + size);
  guarded(ValueOrigin::Stored, [&] {
    encrypt_value(settings, column.key_name, colcrypt::PayloadType::Text,
                  ByteView(reinterpret_cast<const uint8_t*>(column.context), column.context_size),
                  plaintext, reinterpret_cast<uint8_t*>(VARDATA(result)));
  });
  return result;
}

void verify_for_column(int32_t typmod, ByteView envelope) {
  const ColumnKey column = column_key(typmod);
  check_key_privilege(column.key_name, std::strlen(column.key_name), KeyPrivilege::Encrypt);
  guarded(ValueOrigin::Stored, [&] { colcrypt::parse_header(envelope); });
  const KeydSettings settings = prepare_key_access();
  uint8_t* scratch = static_cast<uint8_t*>(palloc(envelope.size));
  guarded(ValueOrigin::Stored, [&] {
    verify_value(settings, envelope,
                 ByteView(reinterpret_cast<const uint8_t*>(column.context), column.context_size),
                 column.key_name, scratch);
  });
  pfree(scratch);
}

}  // namespace colcrypt::pg

// encrypted_typmod_in(cstring[]) -> integer: ('key_name') or ('key_name', 'binding').
// Without a binding, a fresh random one: every column declared this way gets
// an identity of its own, which typmod_out prints so that dumps keep it.
Datum colcrypt_encrypted_typmod_in(PG_FUNCTION_ARGS) {
  ArrayType* array = PG_GETARG_ARRAYTYPE_P(0);
  Datum* items;
  int count;
  deconstruct_array(array, CSTRINGOID, -2, false, TYPALIGN_CHAR, &items, nullptr, &count);
  if (count < 1 || count > 2)
    ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE),
                    errmsg("colcrypt.encrypted takes a key name and optionally a binding"),
                    errhint("Declare the column as colcrypt.encrypted('key_name').")));
  const char* key = DatumGetCString(items[0]);
  if (!valid_name(key))
    ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("invalid colcrypt key name"),
                    errdetail("Key names are 1 to 63 characters from A-Z, a-z, 0-9, '_', '.' "
                              "and '-', and do not start with '.' or '-'.")));
  char binding[64];
  if (count == 2) {
    if (!valid_name(DatumGetCString(items[1])))
      ereport(ERROR,
              (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("invalid colcrypt column binding"),
               errdetail("Bindings follow the rules of key names: 1 to 63 characters from A-Z, "
                         "a-z, 0-9, '_', '.' and '-', not starting with '.' or '-'.")));
    strlcpy(binding, DatumGetCString(items[1]), sizeof binding);
  } else {
    uint8_t random[8];
    if (!pg_strong_random(random, sizeof random))
      ereport(ERROR, (errcode(ERRCODE_INTERNAL_ERROR), errmsg("could not generate random bytes")));
    for (size_t i = 0; i < sizeof random; ++i) snprintf(binding + 2 * i, 3, "%02x", random[i]);
  }
  const int32 typmod = typmod_of(key, binding);
  register_column_key(typmod, key, binding);
  remember_column(typmod, key, binding);
  PG_RETURN_INT32(typmod);
}

// encrypted_typmod_out(integer) -> cstring: "('key_name','binding')".
Datum colcrypt_encrypted_typmod_out(PG_FUNCTION_ARGS) {
  const int32 typmod = PG_GETARG_INT32(0);
  if (typmod < 0) PG_RETURN_CSTRING(pstrdup(""));
  const ColumnKey& column = colcrypt::pg::column_key(typmod);
  PG_RETURN_CSTRING(psprintf("('%s','%s')", column.key_name, column.binding));
}

// encrypted(encrypted, integer, boolean): the typmod coercion Postgres applies
// when a value is stored in (or cast to) a key-bound column. Seals a pending
// plaintext under the column's key; accepts a sealed value only when it was
// sealed for this column (key and binding), and refuses any other.
Datum colcrypt_encrypted_coerce(PG_FUNCTION_ARGS) {
  struct varlena* value = PG_GETARG_VARLENA_PP(0);
  const int32 typmod = PG_GETARG_INT32(1);
  if (typmod < 0) PG_RETURN_POINTER(value);
  const ByteView bytes = bytes_of(value);
  if (!colcrypt::pg::is_pending(bytes)) {
    colcrypt::pg::verify_for_column(typmod, bytes);
    PG_RETURN_POINTER(value);
  }
  if (bytes.size < colcrypt::pg::kPendingOverhead)
    ereport(ERROR, (errcode(ERRCODE_DATA_CORRUPTED), errmsg("malformed colcrypt.encrypted value")));
  const size_t size = bytes.size - colcrypt::pg::kPendingOverhead;
  uint8_t* plaintext = static_cast<uint8_t*>(palloc(size + 1));
  struct varlena* result = nullptr;
  PG_TRY();
  {
    guarded(ValueOrigin::TextInput, [&] { colcrypt::pg::open_pending(bytes, plaintext); });
    result = colcrypt::pg::seal_for_column(typmod, ByteView(plaintext, size));
  }
  PG_FINALLY();
  { explicit_bzero(plaintext, size + 1); }
  PG_END_TRY();
  pfree(plaintext);
  PG_RETURN_POINTER(result);
}

// encrypted(text, integer, boolean): the assignment cast from text (typed
// parameters, INSERT ... SELECT from a text column, ALTER COLUMN ... TYPE).
// Same rule as the input function: a "colcrypt:" prefix claims a sealed value.
Datum colcrypt_text_to_encrypted(PG_FUNCTION_ARGS) {
  text* input = PG_GETARG_TEXT_PP(0);
  const int32 typmod = PG_GETARG_INT32(1);
  const char* data = VARDATA_ANY(input);
  const size_t size = VARSIZE_ANY_EXHDR(input);
  if (colcrypt::pg::claims_sealed(data, size)) {
    struct varlena* value = colcrypt::pg::parse_sealed_text(data, size);
    if (typmod >= 0) colcrypt::pg::verify_for_column(typmod, bytes_of(value));
    PG_RETURN_POINTER(value);
  }
  if (typmod < 0)
    ereport(ERROR, (errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
                    errmsg("plaintext cannot become colcrypt.encrypted without a key"),
                    errdetail("The target has no key: it is colcrypt.encrypted, not "
                              "colcrypt.encrypted('key_name')."),
                    errhint("Store it in a key-bound column, or use colcrypt.encrypt_field(value, "
                            "'key_name').")));
  PG_RETURN_POINTER(colcrypt::pg::seal_for_column(
      typmod, ByteView(reinterpret_cast<const uint8_t*>(data), size)));
}

// require_sealed(encrypted) -> encrypted: wrapped by the planner hook around
// every value stored in a colcrypt.encrypted column that has no key.
Datum colcrypt_require_sealed(PG_FUNCTION_ARGS) {
  struct varlena* value = PG_GETARG_VARLENA_PP(0);
  colcrypt::pg::reject_pending(bytes_of(value));
  PG_RETURN_POINTER(value);
}
