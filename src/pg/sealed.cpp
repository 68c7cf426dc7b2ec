// Sealed columns. Every table column whose type holds colcrypt.encrypted (the
// type, a domain over it, an array or composite or range with one inside, at
// any depth) gets the constraint CHECK (colcrypt.sealed(col)), named
// colcrypt_sealed_<column>: the ddl_command_end event trigger adds it after
// CREATE TABLE, CREATE TABLE AS, SELECT INTO and ALTER TABLE, and a dropped one
// comes back. Postgres checks constraints on every stored row after the BEFORE
// triggers (PL/pgSQL or C), in COPY and in ALTER TABLE rewrites; the rows
// already there were checked as CREATE TABLE AS [EXECUTE] stored them
// (SealedReceiver), or are validated when the check is added (after a rewrite),
// or, after an ALTER TABLE that rewrote nothing, the one possible new value,
// the added columns' stored default, is checked (add_sealed_checks). So no
// pending plaintext reaches a table, whatever path wrote it.
//
// This file: what the check looks for (colcrypt.sealed() and the helpers the
// event triggers and the CREATE TABLE AS receiver share with it).

// postgres.h must come first: keep clang-format from sorting it.
// clang-format off
// Some server headers (spinlocks, via SPI) still use `register`, which C++17
// removed: accept it in them only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wregister"
extern "C" {
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/rangetypes.h"
#include "utils/syscache.h"
#include "utils/typcache.h"
}
#pragma GCC diagnostic pop
// clang-format on

#include <cstdio>
#include <cstring>

#include "pg/columns_internal.hpp"
#include "pg/pending.hpp"

using colcrypt::pg::check_stored;
using colcrypt::pg::guard_functions;

extern "C" {
PG_FUNCTION_INFO_V1(colcrypt_sealed);
}

namespace {

void refuse_unsealed() {
  ereport(ERROR,
          (errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
           errmsg("a colcrypt.encrypted value to be stored is a plaintext that was not encrypted"),
           errdetail("Only the typmod coercion of a key-bound column encrypts plaintext; this "
                     "value reached the row another way (a column without a key, an array or "
                     "composite value, a trigger, a table rewrite)."),
           errhint("Store plaintext in a column declared colcrypt.encrypted('key_name'), or use "
                   "colcrypt.encrypt_field(value, 'key_name').")));
}

}  // namespace

namespace colcrypt::pg {

// The type colcrypt.encrypted and colcrypt.require_sealed(); false when the
// extension is not installed in this database.
bool guard_functions(Oid& type, Oid& check) {
  const Oid ns = colcrypt_namespace(true);
  if (!OidIsValid(ns)) return false;
  type = GetSysCacheOid2(TYPENAMENSP, Anum_pg_type_oid, CStringGetDatum("encrypted"),
                         ObjectIdGetDatum(ns));
  if (!OidIsValid(type)) return false;
  // A catalog lookup, not LookupFuncName: that checks USAGE on the schema, and
  // a role without it (a table owner outside colcrypt_user) could then write
  // to no table at all.
  Oid argtypes[1] = {type};
  check = GetSysCacheOid3(PROCNAMEARGSNSP, Anum_pg_proc_oid, CStringGetDatum("require_sealed"),
                          PointerGetDatum(buildoidvector(argtypes, 1)), ObjectIdGetDatum(ns));
  return OidIsValid(check);
}

// True when values of typid can hold a colcrypt.encrypted.
bool holds_encrypted(Oid typid, Oid type) {
  check_stack_depth();
  typid = getBaseType(typid);
  if (typid == type) return true;
  const Oid element = get_element_type(typid);
  if (OidIsValid(element)) return holds_encrypted(element, type);
  const Oid subtype = get_range_subtype(typid);
  if (OidIsValid(subtype)) return holds_encrypted(subtype, type);
  if (typid != RECORDOID && type_is_rowtype(typid)) {
    const TupleDesc desc = lookup_rowtype_tupdesc(typid, -1);
    bool found = false;
    for (int i = 0; i < desc->natts && !found; ++i) {
      const Form_pg_attribute att = TupleDescAttr(desc, i);
      found = !att->attisdropped && holds_encrypted(att->atttypid, type);
    }
    ReleaseTupleDesc(desc);
    return found;
  }
  return false;
}

// Raises unless every colcrypt.encrypted inside value (of type typid) is sealed.
void check_sealed(Datum value, Oid typid, Oid type) {
  check_stack_depth();
  typid = getBaseType(typid);
  if (typid == type) {
    // The first bytes tell a pending plaintext (a slice: a compressed
    // element is not expanded whole).
    struct varlena* head =
        pg_detoast_datum_slice(reinterpret_cast<struct varlena*>(DatumGetPointer(value)), 0,
                               colcrypt::pg::kPendingMagicSize);
    if (colcrypt::pg::is_pending(bytes_of(head))) refuse_unsealed();
    return;
  }
  if (!holds_encrypted(typid, type)) return;
  const Oid element = get_element_type(typid);
  if (OidIsValid(element)) {
    ArrayIterator it = array_create_iterator(DatumGetArrayTypeP(value), 0, nullptr);
    Datum item;
    bool isnull;
    while (array_iterate(it, &item, &isnull))
      if (!isnull) check_sealed(item, element, type);
    array_free_iterator(it);
    return;
  }
  if (OidIsValid(get_range_subtype(typid))) {
    RangeType* range = DatumGetRangeTypeP(value);
    TypeCacheEntry* cache = lookup_type_cache(RangeTypeGetOid(range), TYPECACHE_RANGE_INFO);
    RangeBound lower;
    RangeBound upper;
    bool empty;
    range_deserialize(cache, range, &lower, &upper, &empty);
    const Oid subtype = cache->rngelemtype->type_id;
    if (!empty && !lower.infinite) check_sealed(lower.val, subtype, type);
    if (!empty && !upper.infinite) check_sealed(upper.val, subtype, type);
    return;
  }
  if (type_is_rowtype(typid)) {
    HeapTupleHeader header = DatumGetHeapTupleHeader(value);
    const TupleDesc desc =
        lookup_rowtype_tupdesc(HeapTupleHeaderGetTypeId(header), HeapTupleHeaderGetTypMod(header));
    HeapTupleData tuple;
    tuple.t_len = HeapTupleHeaderGetDatumLength(header);
    ItemPointerSetInvalid(&tuple.t_self);
    tuple.t_tableOid = InvalidOid;
    tuple.t_data = header;
    Datum* values = static_cast<Datum*>(palloc(desc->natts * sizeof(Datum)));
    bool* nulls = static_cast<bool*>(palloc(desc->natts * sizeof(bool)));
    heap_deform_tuple(&tuple, desc, values, nulls);
    for (int i = 0; i < desc->natts; ++i) {
      const Form_pg_attribute att = TupleDescAttr(desc, i);
      if (!att->attisdropped && !nulls[i]) check_sealed(values[i], att->atttypid, type);
    }
    ReleaseTupleDesc(desc);
    pfree(values);
    pfree(nulls);
  }
}

// What colcrypt.sealed() checks of a value (not null) about to be stored in
// a column of type argtype; direct: argtype is colcrypt.encrypted or a domain
// over it. Raises unless every colcrypt.encrypted inside is sealed.
// True while add_sealed_checks validates the rows of a table its statement
// wrote (a rewrite, CREATE TABLE AS): they were stored before any sealed
// check existed, so their out-of-line values are fetched and checked too.
bool validating_new_rows = false;

void check_stored(Datum datum, Oid argtype, Oid type, bool direct) {
  const struct varlena* value = reinterpret_cast<struct varlena*>(DatumGetPointer(datum));
  // A value still in a table's TOAST storage was read from a table, where
  // it was checked when stored (an UPDATE of other columns): do not fetch it.
  // A pending plaintext made by this statement is always in memory, except in
  // the rows a rewrite stored before the check was added.
  if (VARATT_IS_EXTERNAL_ONDISK(value) && !validating_new_rows) return;
  if (direct && !VARATT_IS_EXTERNAL(value) && !VARATT_IS_COMPRESSED(value)) {
    if (colcrypt::pg::is_pending(bytes_of(value))) refuse_unsealed();
    return;
  }
  check_sealed(datum, argtype, type);
}

// The function colcrypt.sealed(anyelement).
Oid sealed_function() {
  Oid argtypes[1] = {ANYELEMENTOID};
  // A catalog lookup, as in guard_functions: LookupFuncName checks USAGE on
  // the schema, and CREATE TABLE by a role without it would fail.
  const Oid ns = colcrypt_namespace(true);
  if (!OidIsValid(ns)) return InvalidOid;
  return GetSysCacheOid3(PROCNAMEARGSNSP, Anum_pg_proc_oid, CStringGetDatum("sealed"),
                         PointerGetDatum(buildoidvector(argtypes, 1)), ObjectIdGetDatum(ns));
}

// The name of a column's sealed check: colcrypt_sealed_<column>, clipped to
// NAMEDATALEN - 1 bytes at a character boundary.
void sealed_check_name(char (&name)[NAMEDATALEN], const char* column) {
  snprintf(name, sizeof name, "colcrypt_sealed_%s", column);
  name[pg_mbcliplen(name, static_cast<int>(std::strlen(name)), NAMEDATALEN - 1)] = '\0';
}

}  // namespace colcrypt::pg

// sealed(anyelement) -> boolean: the CHECK constraint of every column that
// holds colcrypt.encrypted (see the top of this file). True, or an error
// that says what is wrong (clearer than "violates check constraint").
Datum colcrypt_sealed(PG_FUNCTION_ARGS) {
  if (PG_ARGISNULL(0)) PG_RETURN_BOOL(true);
  // This runs for every stored row: the types are resolved once per
  // expression.
  struct Resolved {
    Oid type;     // colcrypt.encrypted
    Oid argtype;  // the column's type
    bool direct;  // the column is colcrypt.encrypted or a domain over it
  };
  Resolved* r = static_cast<Resolved*>(fcinfo->flinfo->fn_extra);
  if (r == nullptr) {
    Oid type;
    Oid check;
    if (!guard_functions(type, check)) PG_RETURN_BOOL(true);
    r = static_cast<Resolved*>(MemoryContextAlloc(fcinfo->flinfo->fn_mcxt, sizeof(Resolved)));
    r->type = type;
    r->argtype = get_fn_expr_argtype(fcinfo->flinfo, 0);
    r->direct = getBaseType(r->argtype) == type;
    fcinfo->flinfo->fn_extra = r;
  }
  check_stored(PG_GETARG_DATUM(0), r->argtype, r->type, r->direct);
  PG_RETURN_BOOL(true);
}
