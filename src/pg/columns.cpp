// Key-bound columns: the type modifier of colcrypt.encrypted('key_name'
// [, 'binding']), the casts that seal plaintext under a column's key, the
// per-role key privileges, and what keeps pending plaintext out of tables:
// the sealed CHECK constraint on every column holding colcrypt.encrypted
// (added by an event trigger; it sees every stored row, whatever wrote it),
// and the planner and utility hooks that refuse it earlier with a statement's
// own error (INSERT/UPDATE/MERGE, CREATE TABLE AS, COPY FROM at any nesting
// level) and in materialized views, which take no constraints. The event
// trigger on ALTER TABLE also refuses to drop a column's key.
// docs/columns.md describes the design.
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
#include "access/relation.h"
#include "access/tupdesc_details.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_constraint.h"
#include "catalog/pg_inherits.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "commands/dbcommands.h"
#include "commands/event_trigger.h"
#include "executor/executor.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "nodes/nodeFuncs.h"
#include "nodes/parsenodes.h"
#include "nodes/plannodes.h"
#include "nodes/readfuncs.h"
#include "optimizer/planner.h"
#include "parser/parse_func.h"
#include "parser/parser.h"
#include "parser/parse_relation.h"
#include "parser/parse_type.h"
#include "parser/parsetree.h"
#include "storage/bufmgr.h"
#include "storage/proc.h"
#include "tcop/pquery.h"
#include "tcop/utility.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/inval.h"
#include "utils/snapmgr.h"
#include "commands/trigger.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rangetypes.h"
#include "utils/syscache.h"
#include "utils/typcache.h"
}
#pragma GCC diagnostic pop
// clang-format on

#include "pg/columns.hpp"

#include <cstdio>
#include <cstring>
#include <string_view>

#include "core/envelope.hpp"
#include "core/kdf.hpp"
#include "pg/guard.hpp"
#include "pg/key_cache.hpp"
#include "pg/module.hpp"
#include "pg/pending.hpp"

using colcrypt::ByteView;
using colcrypt::pg::ColumnKey;
using colcrypt::pg::guarded;
using colcrypt::pg::KeyPrivilege;
using colcrypt::pg::ValueOrigin;

extern "C" {
PG_FUNCTION_INFO_V1(colcrypt_encrypted_typmod_in);
PG_FUNCTION_INFO_V1(colcrypt_encrypted_typmod_out);
PG_FUNCTION_INFO_V1(colcrypt_encrypted_coerce);
PG_FUNCTION_INFO_V1(colcrypt_text_to_encrypted);
PG_FUNCTION_INFO_V1(colcrypt_require_sealed);
PG_FUNCTION_INFO_V1(colcrypt_reset_privilege_cache);
PG_FUNCTION_INFO_V1(colcrypt_sealed);
PG_FUNCTION_INFO_V1(colcrypt_ddl_start);
PG_FUNCTION_INFO_V1(colcrypt_ddl_end);
PG_FUNCTION_INFO_V1(colcrypt_table_rewrite);
PG_FUNCTION_INFO_V1(colcrypt_key_grants_changed);
}

namespace {

constexpr char kContextPrefix[] = "colcrypt.column:";

ByteView bytes_of(const struct varlena* v) {
  return ByteView(reinterpret_cast<const uint8_t*>(VARDATA_ANY(v)), VARSIZE_ANY_EXHDR(v));
}

bool valid_name(const char* s) {
  bool ok = false;
  guarded(ValueOrigin::Stored, [&] { ok = colcrypt::valid_key_name(s); });
  return ok;
}

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
template <typename Body>
void as_catalog_owner(Oid relid, Body&& body) {
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
    body();
    SPI_finish();
  }
  PG_FINALLY();
  { SetUserIdAndSecContext(saved_user, saved_context); }
  PG_END_TRY();
  AtEOXact_GUC(true, nest);
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

// ---------------------------------------------------------------- privileges

struct PrivilegeEntry {
  Oid user;
  KeyPrivilege privilege;
  bool allowed;
  char key_name[64];
};
constexpr int kPrivilegeCacheSize = 32;
PrivilegeEntry privilege_cache[kPrivilegeCacheSize];
int privilege_cache_used = 0;

// The cache lives until a grant or a role changes, not for one transaction: a
// lookup costs a catalog query, which per transaction made point reads by
// non-superusers about 2x slower (bench/ANALYSIS.md). What invalidates it:
// - colcrypt.key_grants changes: its statement trigger (colcrypt_key_grants_changed)
//   sends a relcache invalidation of the table, which every backend receives
//   (its own at the next command, others at their next transaction or lock);
// - role membership or role attributes change: syscache invalidations of
//   pg_auth_members and pg_authid, sent by Postgres itself;
// - an abort (module.cpp), and a reset of the whole relcache.
// privilege_generation counts invalidations: a lookup whose query ran while
// one arrived is used once but not cached, so an entry is never older than
// the last invalidation it could have missed.
uint64 privilege_generation = 0;
Oid key_grants_relid = InvalidOid;  // learnt at the first lookup
bool privilege_callbacks_registered = false;
bool privileges_for_transaction = false;  // an entry came from the transaction's snapshot

void forget_privileges() {
  privilege_cache_used = 0;
  privileges_for_transaction = false;
  ++privilege_generation;
}

void privileges_relcache_callback(Datum, Oid relid) {
  if (relid == InvalidOid || relid == key_grants_relid || key_grants_relid == InvalidOid)
    forget_privileges();
}

void privileges_syscache_callback(Datum, int, uint32) { forget_privileges(); }

const char* privilege_name(KeyPrivilege p) {
  switch (p) {
    case KeyPrivilege::Encrypt:
      return "encrypt";
    case KeyPrivilege::Decrypt:
      return "decrypt";
    case KeyPrivilege::BlindIndex:
      return "blind_index";
  }
  return "?";
}

// Any number of grantee rows, and any depth of membership, in one query. A
// row counts only while its role still has the name it was granted under
// (role_name): roles are cluster-wide and Postgres records no dependency of
// this catalog on them, so after DROP ROLE a new role may receive the same
// OID, and it must not inherit the dropped role's grants.
bool lookup_privilege(Oid user, const char* key, KeyPrivilege privilege) {
  bool allowed = false;
  key_grants_relid = catalog_relid("key_grants");
  as_catalog_owner(key_grants_relid, [&] {
    Oid types[3] = {TEXTOID, TEXTOID, OIDOID};
    Datum values[3] = {CStringGetTextDatum(key), CStringGetTextDatum(privilege_name(privilege)),
                       ObjectIdGetDatum(user)};
    SPIPlanPtr plan = SPI_prepare(
        "SELECT 1 FROM colcrypt.key_grants g "
        "JOIN pg_catalog.pg_roles a ON a.oid OPERATOR(pg_catalog.=) g.role::pg_catalog.oid "
        "AND a.rolname OPERATOR(pg_catalog.=) g.role_name "
        "WHERE g.key_name OPERATOR(pg_catalog.=) $1 "
        "AND g.privilege OPERATOR(pg_catalog.=) $2 "
        "AND pg_catalog.pg_has_role($3, a.oid, 'USAGE') LIMIT 1",
        3, types);
    if (plan == nullptr) elog(ERROR, "SPI_prepare failed");
    // The latest committed grants, not the transaction's snapshot: the result
    // is cached past this transaction (see privilege_generation). Parallel
    // mode cannot take a new snapshot: there the transaction's is used and
    // the cache is dropped when the transaction ends.
    const bool parallel = IsInParallelMode();
    if (parallel) privileges_for_transaction = true;
    Snapshot snapshot = parallel ? GetActiveSnapshot() : GetLatestSnapshot();
    if (SPI_execute_snapshot(plan, values, nullptr, snapshot, InvalidSnapshot, true, false, 1) !=
        SPI_OK_SELECT)
      elog(ERROR, "SPI_execute_snapshot failed");
    allowed = SPI_processed > 0;
  });
  return allowed;
}

// ---------------------------------------------------------------- planner hook

planner_hook_type previous_planner = nullptr;

bool is_call_of(Node* node, Oid funcid) {
  if (node != nullptr && IsA(node, RelabelType))
    node = reinterpret_cast<Node*>(reinterpret_cast<RelabelType*>(node)->arg);
  return node != nullptr && IsA(node, FuncExpr) &&
         reinterpret_cast<FuncExpr*>(node)->funcid == funcid;
}

// True when a value of (type_oid, typmod) is a colcrypt.encrypted without a
// key: the type itself or a domain over it, with no key in the type modifier.
bool keyless(Oid type_oid, int32 typmod, Oid type) {
  const Oid base = getBaseTypeAndTypmod(type_oid, &typmod);
  return base == type && typmod < 0;
}

// require_sealed(expr), relabelled to expr's own type (a domain) if need be.
Expr* require_sealed_call(Expr* expr, Oid type, Oid check) {
  const Oid expr_type = exprType(reinterpret_cast<Node*>(expr));
  const int32 expr_typmod = exprTypmod(reinterpret_cast<Node*>(expr));
  Expr* call = reinterpret_cast<Expr*>(
      makeFuncExpr(check, type, list_make1(expr), InvalidOid, InvalidOid, COERCE_EXPLICIT_CALL));
  if (expr_type != type)
    call = reinterpret_cast<Expr*>(
        makeRelabelType(call, expr_type, expr_typmod, InvalidOid, COERCE_IMPLICIT_CAST));
  return call;
}

void guard_targets(List* targets, Oid relid, Oid type, Oid check) {
  ListCell* lc;
  foreach (lc, targets) {
    TargetEntry* tle = lfirst_node(TargetEntry, lc);
    if (tle->resjunk || tle->resno <= 0) continue;
    Oid atttype;
    int32 atttypmod;
    Oid attcollation;
    get_atttypetypmodcoll(relid, tle->resno, &atttype, &atttypmod, &attcollation);
    if (!keyless(atttype, atttypmod, type)) continue;
    if (is_call_of(reinterpret_cast<Node*>(tle->expr), check)) continue;
    tle->expr = require_sealed_call(tle->expr, type, check);
  }
}

// The query of CREATE TABLE AS, SELECT INTO, CREATE MATERIALIZED VIEW and
// REFRESH MATERIALIZED VIEW: every output column that would become a column
// without a key gets require_sealed(). Output columns with a key keep their
// type modifier (the coercion already sealed them).
void guard_select(Query* query, Oid type, Oid check) {
  ListCell* lc;
  if (query->setOperations != nullptr) {
    foreach (lc, query->rtable) {
      RangeTblEntry* rte = lfirst_node(RangeTblEntry, lc);
      if (rte->rtekind == RTE_SUBQUERY && rte->subquery != nullptr)
        guard_select(rte->subquery, type, check);
    }
    return;
  }
  foreach (lc, query->targetList) {
    TargetEntry* tle = lfirst_node(TargetEntry, lc);
    if (tle->resjunk) continue;
    Node* expr = reinterpret_cast<Node*>(tle->expr);
    if (!keyless(exprType(expr), exprTypmod(expr), type)) continue;
    if (is_call_of(expr, check)) continue;
    tle->expr = require_sealed_call(tle->expr, type, check);
  }
}

void guard_query(Query* query, Oid type, Oid check) {
  ListCell* lc;
  foreach (lc, query->cteList) {
    CommonTableExpr* cte = lfirst_node(CommonTableExpr, lc);
    if (cte->ctequery != nullptr && IsA(cte->ctequery, Query))
      guard_query(reinterpret_cast<Query*>(cte->ctequery), type, check);
  }
  if (query->resultRelation <= 0) return;
  if (query->commandType != CMD_INSERT && query->commandType != CMD_UPDATE &&
      query->commandType != CMD_MERGE)
    return;
  const RangeTblEntry* rte = rt_fetch(query->resultRelation, query->rtable);
  if (rte->rtekind != RTE_RELATION) return;
  guard_targets(query->targetList, rte->relid, type, check);
  if (query->onConflict != nullptr)
    guard_targets(query->onConflict->onConflictSet, rte->relid, type, check);
  foreach (lc, query->mergeActionList) {
    MergeAction* action = lfirst_node(MergeAction, lc);
    guard_targets(action->targetList, rte->relid, type, check);
  }
}

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

// ---------------------------------------------------------------- sealed columns
//
// Every table column whose type holds colcrypt.encrypted (the type, a domain
// over it, an array or composite or range with one inside, at any depth) gets
// the constraint CHECK (colcrypt.sealed(col)), named colcrypt_sealed_<column>:
// the ddl_command_end event trigger adds it after CREATE TABLE, CREATE TABLE
// AS, SELECT INTO and ALTER TABLE, and a dropped one comes back. Postgres
// checks constraints on every stored row after the BEFORE triggers (PL/pgSQL
// or C), in COPY and in ALTER TABLE rewrites; the rows already there were
// checked as CREATE TABLE AS [EXECUTE] stored them (SealedReceiver), or are
// validated when the check is added (after a rewrite), or, after an ALTER
// TABLE that rewrote nothing, the one possible new value, the added columns'
// stored default, is checked (add_sealed_checks). So no pending plaintext
// reaches a table, whatever path wrote it.

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

// True when rel has CHECK (colcrypt.sealed(<attnum>)).
bool has_sealed_check(Relation rel, AttrNumber attnum, Oid sealed) {
  const TupleConstr* constr = RelationGetDescr(rel)->constr;
  if (constr == nullptr) return false;
  for (int i = 0; i < constr->num_check; ++i) {
    Node* expr = static_cast<Node*>(stringToNode(constr->check[i].ccbin));
    if (!IsA(expr, FuncExpr)) continue;
    const FuncExpr* call = reinterpret_cast<FuncExpr*>(expr);
    if (call->funcid != sealed || list_length(call->args) != 1) continue;
    const Node* arg = static_cast<Node*>(linitial(call->args));
    if (IsA(arg, Var) && reinterpret_cast<const Var*>(arg)->varattno == attnum) return true;
  }
  return false;
}

// True when con is "CONSTRAINT name CHECK (colcrypt.sealed(col)) NOT VALID"
// (what pg_dump writes for a sealed check added NOT VALID) and relid already
// has a sealed check on col under that name. Reads the catalog only: the
// caller (ddl_command_start) holds no lock on relid yet.
bool duplicate_sealed_check(Oid relid, const Constraint* con, Oid sealed) {
  if (con == nullptr || !IsA(con, Constraint) || con->contype != CONSTR_CHECK ||
      !con->skip_validation || con->conname == nullptr || con->raw_expr == nullptr ||
      !IsA(con->raw_expr, FuncCall))
    return false;
  const FuncCall* call = reinterpret_cast<const FuncCall*>(con->raw_expr);
  if (std::strcmp(strVal(llast(call->funcname)), "sealed") != 0 || list_length(call->args) != 1 ||
      !IsA(linitial(call->args), ColumnRef))
    return false;
  const ColumnRef* ref = static_cast<const ColumnRef*>(linitial(call->args));
  if (list_length(ref->fields) != 1 || !IsA(linitial(ref->fields), String)) return false;
  const AttrNumber attnum = get_attnum(relid, strVal(linitial(ref->fields)));
  if (attnum == InvalidAttrNumber) return false;
  const Oid existing = get_relation_constraint_oid(relid, con->conname, true);
  if (!OidIsValid(existing)) return false;
  HeapTuple tuple = SearchSysCache1(CONSTROID, ObjectIdGetDatum(existing));
  if (!HeapTupleIsValid(tuple)) return false;
  bool isnull;
  const Datum bin = SysCacheGetAttr(CONSTROID, tuple, Anum_pg_constraint_conbin, &isnull);
  bool same = false;
  if (!isnull) {
    const Node* expr = static_cast<Node*>(stringToNode(TextDatumGetCString(bin)));
    if (IsA(expr, FuncExpr)) {
      const FuncExpr* f = reinterpret_cast<const FuncExpr*>(expr);
      const Node* arg = list_length(f->args) == 1 ? static_cast<Node*>(linitial(f->args)) : nullptr;
      same = f->funcid == sealed && arg != nullptr && IsA(arg, Var) &&
             reinterpret_cast<const Var*>(arg)->varattno == attnum;
    }
  }
  ReleaseSysCache(tuple);
  return same;
}

// Tables rewritten in this transaction (event table_rewrite): their rows
// were all written anew, so a check added after must validate them.
List* rewritten = NIL;  // in TopTransactionContext
LocalTransactionId rewritten_in = InvalidLocalTransactionId;

void note_rewrite(Oid relid) {
  if (rewritten_in != MyProc->lxid) {
    rewritten = NIL;
    rewritten_in = MyProc->lxid;
  }
  const MemoryContext old = MemoryContextSwitchTo(TopTransactionContext);
  rewritten = lappend_oid(rewritten, relid);
  MemoryContextSwitchTo(old);
}

bool rewritten_now(const List* relids) {
  if (rewritten_in != MyProc->lxid) return false;
  const ListCell* lc;
  foreach (lc, relids)
    if (list_member_oid(rewritten, lfirst_oid(lc))) return true;
  return false;
}

// True when none of the relations has a block of data: validating a check on
// them costs nothing.
bool all_empty(const List* relids) {
  const ListCell* lc;
  foreach (lc, relids) {
    Relation rel = relation_open(lfirst_oid(lc), AccessShareLock);
    const bool empty =
        !RELKIND_HAS_STORAGE(rel->rd_rel->relkind) || RelationGetNumberOfBlocks(rel) == 0;
    relation_close(rel, AccessShareLock);
    if (!empty) return false;
  }
  return true;
}

// The name of a column's sealed check: colcrypt_sealed_<column>, clipped to
// NAMEDATALEN - 1 bytes at a character boundary.
void sealed_check_name(char (&name)[NAMEDATALEN], const char* column) {
  snprintf(name, sizeof name, "colcrypt_sealed_%s", column);
  name[pg_mbcliplen(name, static_cast<int>(std::strlen(name)), NAMEDATALEN - 1)] = '\0';
}

// How add_sealed_checks treats the rows already in the table.
enum class ExistingRows {
  // Checked by a scan under the ALTER TABLE's lock: a new table filled by a
  // query, a table after a rewrite, or an empty one.
  Validate,
  // An ALTER TABLE that rewrote nothing and has rows (ADD COLUMN, the online
  // migration of a large table): the only values that can be new are the
  // added columns' stored default ("missing value"), checked here, and the
  // check is added NOT VALID: no scan, no long lock; it holds for every row
  // written from now on, and ALTER TABLE ... VALIDATE CONSTRAINT checks the
  // old rows under a lock that lets writes go on.
  NotValid,
  // Every row was checked as it was stored (CREATE TABLE AS, see
  // SealedReceiver): the check is added valid without a scan, as CREATE TABLE
  // adds its own checks (skip_validation, initially_valid).
  Checked,
};

// Adds the missing sealed checks of a table (and, through ALTER TABLE, of its
// inheritors and partitions), all in one ALTER TABLE: the event trigger that
// this ALTER TABLE fires in turn finds nothing left to add. Runs inside SPI.
void add_sealed_checks(Oid relid, Oid type, Oid sealed, ExistingRows rows) {
  Relation rel = try_relation_open(relid, AccessShareLock);
  if (rel == nullptr) return;
  const char relkind = rel->rd_rel->relkind;
  StringInfoData command;
  initStringInfo(&command);
  List* columns = NIL;
  if (relkind == RELKIND_RELATION || relkind == RELKIND_PARTITIONED_TABLE) {
    const TupleDesc desc = RelationGetDescr(rel);
    for (int i = 0; i < desc->natts; ++i) {
      const Form_pg_attribute att = TupleDescAttr(desc, i);
      if (att->attisdropped || !holds_encrypted(att->atttypid, type)) continue;
      if (has_sealed_check(rel, att->attnum, sealed)) continue;
      char name[NAMEDATALEN];
      sealed_check_name(name, NameStr(att->attname));
      appendStringInfo(&command, "%s ADD CONSTRAINT %s CHECK (colcrypt.sealed(%s))%s",
                       command.len == 0 ? "" : ",", quote_identifier(name),
                       quote_identifier(NameStr(att->attname)),
                       rows == ExistingRows::NotValid ? " NOT VALID" : "");
      columns = lappend(columns, pstrdup(NameStr(att->attname)));
    }
  }
  const char* table = quote_qualified_identifier(get_namespace_name(RelationGetNamespace(rel)),
                                                 RelationGetRelationName(rel));
  relation_close(rel, AccessShareLock);
  if (command.len == 0) return;
  if (rows == ExistingRows::NotValid) {
    List* relids = find_all_inheritors(relid, AccessShareLock, nullptr);
    ListCell* lc;
    foreach (lc, relids) {
      Relation child = relation_open(lfirst_oid(lc), AccessShareLock);
      const TupleDesc desc = RelationGetDescr(child);
      ListCell* cc;
      foreach (cc, columns) {
        const AttrNumber attnum = attnameAttNum(child, static_cast<const char*>(lfirst(cc)), false);
        if (attnum <= 0 || desc->constr == nullptr || desc->constr->missing == nullptr) continue;
        const AttrMissing& missing = desc->constr->missing[attnum - 1];
        if (missing.am_present)
          check_sealed(missing.am_value, TupleDescAttr(desc, attnum - 1)->atttypid, type);
      }
      relation_close(child, AccessShareLock);
    }
  }
  const char* sql = psprintf("ALTER TABLE %s%s", table, command.data);
  if (rows != ExistingRows::Checked) {
    validating_new_rows = rows == ExistingRows::Validate;
    PG_TRY();
    {
      if (SPI_execute(sql, false, 0) != SPI_OK_UTILITY) elog(ERROR, "SPI_execute failed");
    }
    PG_FINALLY();
    { validating_new_rows = false; }
    PG_END_TRY();
    return;
  }
  // The same statement (event triggers see the same command), its constraints
  // marked valid without a scan; SQL has no syntax for that, so it runs as a
  // parse tree, with what SPI would do around it.
  RawStmt* raw = linitial_node(RawStmt, raw_parser(sql, RAW_PARSE_DEFAULT));
  ListCell* lc;
  foreach (lc, castNode(AlterTableStmt, raw->stmt)->cmds) {
    Constraint* con = castNode(Constraint, lfirst_node(AlterTableCmd, lc)->def);
    con->skip_validation = true;
    con->initially_valid = true;
  }
  PlannedStmt* pstmt = makeNode(PlannedStmt);
  pstmt->commandType = CMD_UTILITY;
  pstmt->utilityStmt = raw->stmt;
  pstmt->stmt_location = raw->stmt_location;
  pstmt->stmt_len = raw->stmt_len;
  CommandCounterIncrement();
  PushActiveSnapshot(GetTransactionSnapshot());
  ProcessUtility(pstmt, sql, false, PROCESS_UTILITY_QUERY, nullptr, nullptr, None_Receiver,
                 nullptr);
  PopActiveSnapshot();
  CommandCounterIncrement();
}

// ---------------------------------------------------------------- CREATE TABLE AS
//
// CREATE TABLE AS, SELECT INTO and CREATE TABLE ... AS EXECUTE check every row
// as they store it (SealedReceiver, around the statement's DestIntoRel
// receiver), so the sealed checks that ddl_end adds afterwards need no scan of
// the new table. A frame per statement that makes a relation from a query
// (and per EXPLAIN of one) tells ddl_end whether its receiver saw every row:
// the utility hook keeps it on the C stack around the statement. A statement
// that began before this library was loaded (the first CREATE TABLE AS of a
// session, whose query loads it) gets late_frame from its own
// ddl_command_start trigger (colcrypt_ddl_start). Without a frame, ddl_end
// validates as before.

enum class FrameKind {
  Table,    // CREATE TABLE AS / SELECT INTO / ... AS EXECUTE storing rows
  Explain,  // EXPLAIN [ANALYZE] CREATE TABLE AS / SELECT INTO
  Other,    // WITH NO DATA, CREATE MATERIALIZED VIEW: no change
};

struct TableFrame {
  TableFrame* previous;
  FrameKind kind;
  const IntoClause* into;
  int runs;       // executor runs into a new relation under this frame
  bool complete;  // the one run returned normally: every row was checked
  Oid relid;      // the relation it made
};

TableFrame* current_frame = nullptr;
TableFrame late_frame;
SubTransactionId late_frame_subxact = InvalidSubTransactionId;

FrameKind frame_kind(const CreateTableAsStmt* stmt) {
  return stmt->objtype == OBJECT_TABLE && !stmt->into->skipData ? FrameKind::Table
                                                                 : FrameKind::Other;
}

// A late frame ends with its statement's ddl_end, or when its transaction or
// subtransaction does (an error before).
void forget_late_frame() {
  if (current_frame == &late_frame) current_frame = late_frame.previous;
  late_frame_subxact = InvalidSubTransactionId;
}

void late_frame_xact_callback(XactEvent event, void*) {
  if (event != XACT_EVENT_PRE_COMMIT && event != XACT_EVENT_PARALLEL_PRE_COMMIT &&
      event != XACT_EVENT_PRE_PREPARE)
    forget_late_frame();
}

void late_frame_subxact_callback(SubXactEvent event, SubTransactionId subxact, SubTransactionId,
                                 void*) {
  if (event == SUBXACT_EVENT_ABORT_SUB && late_frame_subxact != InvalidSubTransactionId &&
      late_frame_subxact >= subxact)
    forget_late_frame();
}

struct SealedColumn {
  int attno;  // 0-based
  Oid argtype;
  bool direct;
  char check_name[NAMEDATALEN];
};

// Wraps the DestIntoRel receiver: applies colcrypt.sealed()'s check to every
// column holding colcrypt.encrypted of every row before the row is stored.
struct SealedReceiver {
  DestReceiver pub;  // first: Postgres passes &pub
  DestReceiver* inner;
  TableFrame* frame;  // nullptr: the statement began before the library loaded
  bool explain;       // EXPLAIN ANALYZE: refused when a column holds colcrypt.encrypted
  Oid type;
  int ncolumns;
  int natts;  // attributes to deform: up to the last checked column
  SealedColumn* columns;
  const SealedColumn* checking;  // for the error context
  const char* table;
};

void sealed_receiver_context(void* arg) {
  const SealedReceiver* r = static_cast<const SealedReceiver*>(arg);
  if (r->checking != nullptr)
    errcontext("sealed check \"%s\" of new table %s, checked as the row is stored",
               r->checking->check_name, r->table);
}

void sealed_receiver_startup(DestReceiver* self, int operation, TupleDesc typeinfo) {
  SealedReceiver* r = reinterpret_cast<SealedReceiver*>(self);
  Oid check;
  r->columns = static_cast<SealedColumn*>(palloc0(sizeof(SealedColumn) * typeinfo->natts));
  if (guard_functions(r->type, check)) {
    for (int i = 0; i < typeinfo->natts; ++i) {
      const Form_pg_attribute att = TupleDescAttr(typeinfo, i);
      if (att->attisdropped || !holds_encrypted(att->atttypid, r->type)) continue;
      SealedColumn& c = r->columns[r->ncolumns++];
      c.attno = i;
      c.argtype = att->atttypid;
      c.direct = getBaseType(att->atttypid) == r->type;
      r->natts = i + 1;
    }
  }
  if (r->ncolumns > 0 && r->explain)
    ereport(ERROR,
            (errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
             errmsg("EXPLAIN ANALYZE cannot create a table with colcrypt.encrypted columns"),
             errdetail("EXPLAIN fires no event triggers, so the table would get no sealed checks "
                       "(colcrypt_sealed_<column>)."),
             errhint("Run the CREATE TABLE AS itself, or EXPLAIN it without ANALYZE.")));
  r->inner->rStartup(r->inner, operation, typeinfo);
  // The relation exists now (the inner receiver made it): its name and its
  // columns' names (CREATE TABLE t (a, b) AS renames them) for the errors.
  // Looked up where it was created, not through search_path (a temporary
  // table of the same name would come first).
  const RangeVar* rel = r->frame != nullptr && r->frame->into != nullptr ? r->frame->into->rel
                                                                          : nullptr;
  const Oid relid =
      rel != nullptr ? get_relname_relid(rel->relname, RangeVarGetCreationNamespace(rel))
                     : InvalidOid;
  if (r->frame != nullptr) r->frame->relid = relid;
  r->table = OidIsValid(relid) ? quote_qualified_identifier(
                                     get_namespace_name(get_rel_namespace(relid)),
                                     get_rel_name(relid))
                               : "(being created)";
  for (int i = 0; i < r->ncolumns; ++i) {
    SealedColumn& c = r->columns[i];
    const char* name = OidIsValid(relid) ? get_attname(relid, c.attno + 1, true) : nullptr;
    sealed_check_name(c.check_name,
                      name != nullptr ? name : NameStr(TupleDescAttr(typeinfo, c.attno)->attname));
  }
}

bool sealed_receiver_receive(TupleTableSlot* slot, DestReceiver* self) {
  SealedReceiver* r = reinterpret_cast<SealedReceiver*>(self);
  if (r->ncolumns > 0) {
    slot_getsomeattrs(slot, r->natts);
    ErrorContextCallback context;
    context.callback = sealed_receiver_context;
    context.arg = r;
    context.previous = error_context_stack;
    error_context_stack = &context;
    for (int i = 0; i < r->ncolumns; ++i) {
      const SealedColumn& c = r->columns[i];
      if (slot->tts_isnull[c.attno]) continue;
      r->checking = &c;
      check_stored(slot->tts_values[c.attno], c.argtype, r->type, c.direct);
    }
    r->checking = nullptr;
    error_context_stack = context.previous;
  }
  return r->inner->receiveSlot(slot, r->inner);
}

void sealed_receiver_shutdown(DestReceiver* self) {
  DestReceiver* inner = reinterpret_cast<SealedReceiver*>(self)->inner;
  inner->rShutdown(inner);
}

void sealed_receiver_destroy(DestReceiver* self) {
  DestReceiver* inner = reinterpret_cast<SealedReceiver*>(self)->inner;
  inner->rDestroy(inner);
  pfree(self);
}

ExecutorRun_hook_type previous_executor_run = nullptr;

void run_executor(QueryDesc* query, ScanDirection direction, uint64 count, bool execute_once) {
  if (previous_executor_run != nullptr)
    previous_executor_run(query, direction, count, execute_once);
  else
    standard_ExecutorRun(query, direction, count, execute_once);
}

// Puts a SealedReceiver around the receiver of CREATE TABLE AS and of
// EXPLAIN ANALYZE of one, and marks the statement's frame complete when the
// run stored every row. Without a frame (EXPLAIN ANALYZE in a session whose
// query loaded the library, or event triggers not firing), only EXPLAIN
// ANALYZE (instrumented) is wrapped, to be refused.
void colcrypt_executor_run(QueryDesc* query, ScanDirection direction, uint64 count,
                           bool execute_once) {
  TableFrame* const frame = current_frame;
  const bool into_relation = query->dest != nullptr && query->dest->mydest == DestIntoRel;
  if (!into_relation || (frame != nullptr ? frame->kind == FrameKind::Other
                                          : query->instrument_options == 0)) {
    run_executor(query, direction, count, execute_once);
    return;
  }
  if (frame != nullptr) {
    ++frame->runs;
    frame->complete = false;
  }
  SealedReceiver* receiver = static_cast<SealedReceiver*>(palloc0(sizeof(SealedReceiver)));
  receiver->pub.receiveSlot = sealed_receiver_receive;
  receiver->pub.rStartup = sealed_receiver_startup;
  receiver->pub.rShutdown = sealed_receiver_shutdown;
  receiver->pub.rDestroy = sealed_receiver_destroy;
  receiver->pub.mydest = DestIntoRel;
  receiver->inner = query->dest;
  receiver->frame = frame;
  receiver->explain = frame == nullptr || frame->kind == FrameKind::Explain;
  DestReceiver* const inner = query->dest;
  query->dest = &receiver->pub;
  PG_TRY();
  { run_executor(query, direction, count, execute_once); }
  PG_FINALLY();
  { query->dest = inner; }
  PG_END_TRY();
  if (frame != nullptr && frame->runs == 1 && count == 0 && ScanDirectionIsForward(direction))
    frame->complete = true;
}

// CREATE TABLE AS / CREATE MATERIALIZED VIEW / REFRESH MATERIALIZED VIEW
// statements running. While one runs, every SELECT planned gets the check:
// its own query, and also any other (an event trigger's, a function's), which
// costs a check of sealed values at most and never misses the statement's own
// query.
int table_from_select_depth = 0;
// COPY FROM statements running (at any nesting level: in functions, DO blocks).
int copy_from_depth = 0;

PlannedStmt* colcrypt_planner(Query* parse, const char* query_string, int cursor_options,
                              ParamListInfo bound_params) {
  const bool table_from_select = table_from_select_depth > 0;
  const bool writes = parse->commandType != CMD_SELECT && parse->commandType != CMD_UTILITY;
  const bool select_into_table = table_from_select && parse->commandType == CMD_SELECT;
  if (writes || select_into_table || parse->cteList != NIL) {
    Oid type;
    Oid check;
    if (guard_functions(type, check)) {
      // also a SELECT's data-modifying CTEs
      guard_query(parse, type, check);
      if (select_into_table) guard_select(parse, type, check);
    }
  }
  if (previous_planner != nullptr)
    return previous_planner(parse, query_string, cursor_options, bound_params);
  return standard_planner(parse, query_string, cursor_options, bound_params);
}

ProcessUtility_hook_type previous_utility = nullptr;

void colcrypt_utility(PlannedStmt* pstmt, const char* query_string, bool read_only_tree,
                      ProcessUtilityContext context, ParamListInfo params,
                      QueryEnvironment* query_env, DestReceiver* dest, QueryCompletion* qc) {
  Node* stmt = pstmt->utilityStmt;
  volatile const bool copy_from = IsA(stmt, CopyStmt) && reinterpret_cast<CopyStmt*>(stmt)->is_from;
  Node* explained = IsA(stmt, ExplainStmt) ? reinterpret_cast<ExplainStmt*>(stmt)->query : nullptr;
  if (explained != nullptr && IsA(explained, Query))
    explained = reinterpret_cast<Query*>(explained)->utilityStmt;
  const CreateTableAsStmt* ctas = nullptr;
  if (IsA(stmt, CreateTableAsStmt))
    ctas = reinterpret_cast<CreateTableAsStmt*>(stmt);
  else if (explained != nullptr && IsA(explained, CreateTableAsStmt))
    ctas = reinterpret_cast<CreateTableAsStmt*>(explained);
  volatile const bool table_from_select = ctas != nullptr || IsA(stmt, RefreshMatViewStmt);
  volatile const bool framed = ctas != nullptr;
  // This statement's frame (see SealedReceiver); nested ones have their own.
  TableFrame frame{};
  if (framed) {
    frame.previous = current_frame;
    frame.kind = frame_kind(ctas);
    // (WITH NO DATA too: EXPLAIN ANALYZE makes the empty table)
    if (explained != nullptr && ctas->objtype == OBJECT_TABLE) frame.kind = FrameKind::Explain;
    frame.into = ctas->into;
    current_frame = &frame;
  }
  if (copy_from) ++copy_from_depth;
  if (table_from_select) ++table_from_select_depth;
  // (PG_CATCH, not PG_FINALLY: gcc warns that PG_FINALLY's flag might be
  // clobbered here)
  const auto leave = [&] {
    if (copy_from) --copy_from_depth;
    if (table_from_select) --table_from_select_depth;
    if (framed) current_frame = frame.previous;
  };
  PG_TRY();
  {
    if (previous_utility != nullptr)
      previous_utility(pstmt, query_string, read_only_tree, context, params, query_env, dest, qc);
    else
      standard_ProcessUtility(pstmt, query_string, read_only_tree, context, params, query_env, dest,
                              qc);
  }
  PG_CATCH();
  {
    leave();
    PG_RE_THROW();
  }
  PG_END_TRY();
  leave();
}

}  // namespace

namespace colcrypt::pg {

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

void check_key_privilege(const char* key_name, size_t key_name_size, KeyPrivilege privilege) {
  // First, and without echoing it: a "name" that is not one may be a
  // plaintext passed in the wrong argument, and the denial below would put
  // it into the error, the server log and keyd's audit log.
  bool valid = false;
  guarded(ValueOrigin::Stored,
          [&] { valid = valid_key_name(std::string_view(key_name, key_name_size)); });
  if (!valid)
    ereport(ERROR, (errcode(ERRCODE_INVALID_PARAMETER_VALUE), errmsg("invalid colcrypt key name"),
                    errdetail("Key names are 1 to 63 characters from A-Z, a-z, 0-9, '_', '.' "
                              "and '-', and do not start with '.' or '-'.")));
  if (superuser()) return;
  char key[64];
  if (key_name_size >= sizeof key) key_name_size = sizeof key - 1;
  std::memcpy(key, key_name, key_name_size);
  key[key_name_size] = '\0';
  const Oid user = GetUserId();
  bool allowed = false;
  bool cached = false;
  for (int i = 0; i < privilege_cache_used; ++i) {
    const PrivilegeEntry& e = privilege_cache[i];
    if (e.user == user && e.privilege == privilege && std::strcmp(e.key_name, key) == 0) {
      allowed = e.allowed;
      cached = true;
      break;
    }
  }
  if (!cached) {
    if (!privilege_callbacks_registered) {
      CacheRegisterRelcacheCallback(privileges_relcache_callback, 0);
      CacheRegisterSyscacheCallback(AUTHMEMROLEMEM, privileges_syscache_callback, 0);
      CacheRegisterSyscacheCallback(AUTHOID, privileges_syscache_callback, 0);
      privilege_callbacks_registered = true;
    }
    const uint64 generation = privilege_generation;
    allowed = lookup_privilege(user, key, privilege);
    if (generation == privilege_generation && privilege_cache_used < kPrivilegeCacheSize) {
      PrivilegeEntry& e = privilege_cache[privilege_cache_used++];
      e.user = user;
      e.privilege = privilege;
      e.allowed = allowed;
      strlcpy(e.key_name, key, sizeof e.key_name);
    }
  }
  if (!allowed) {
    const char* role = GetUserNameFromId(user, false);
    const KeydSettings settings = prepare_key_access();
    const char* database = get_database_name(MyDatabaseId);
    report_denial(settings, key, privilege_name(privilege), role,
                  database != nullptr ? database : "");
    ereport(ERROR, (errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
                    errmsg("permission denied to %s with colcrypt key \"%s\"",
                           privilege == KeyPrivilege::BlindIndex ? "compute blind indexes"
                                                                 : privilege_name(privilege),
                           key),
                    errdetail("Role \"%s\" has no %s privilege on the key.", role,
                              privilege_name(privilege)),
                    errhint("A superuser grants it with colcrypt.grant_key('%s', '%s', '%s').", key,
                            role, privilege_name(privilege))));
  }
}

void reset_key_privileges() { forget_privileges(); }

void end_transaction_privileges(bool committed) {
  if (!committed || privileges_for_transaction) forget_privileges();
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

bool in_copy_from() {
  if (copy_from_depth > 0) return true;
  if (ActivePortal == nullptr || ActivePortal->commandTag != CMDTAG_COPY) return false;
  ListCell* lc;
  foreach (lc, ActivePortal->stmts) {
    Node* stmt = static_cast<Node*>(lfirst(lc));
    if (IsA(stmt, PlannedStmt)) stmt = reinterpret_cast<PlannedStmt*>(stmt)->utilityStmt;
    if (stmt != nullptr && IsA(stmt, CopyStmt) && reinterpret_cast<CopyStmt*>(stmt)->is_from)
      return true;
  }
  return false;
}

void install_column_hooks() {
  previous_planner = planner_hook;
  planner_hook = colcrypt_planner;
  previous_utility = ProcessUtility_hook;
  ProcessUtility_hook = colcrypt_utility;
  previous_executor_run = ExecutorRun_hook;
  ExecutorRun_hook = colcrypt_executor_run;
  RegisterXactCallback(late_frame_xact_callback, nullptr);
  RegisterSubXactCallback(late_frame_subxact_callback, nullptr);
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

// reset_privilege_cache(): called by grant_key / revoke_key.
Datum colcrypt_reset_privilege_cache(PG_FUNCTION_ARGS) {
  colcrypt::pg::reset_key_privileges();
  PG_RETURN_VOID();
}

// sealed(anyelement) -> boolean: the CHECK constraint of every column that
// holds colcrypt.encrypted (see "sealed columns" above). True, or an error
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

// Event trigger on ddl_command_start for ALTER TABLE: refuses to turn a
// key-bound column into one without a key (ALTER COLUMN c TYPE
// colcrypt.encrypted), which would drop its key and binding silently. An
// event trigger rather than the utility hook: it runs even in a session that
// has not loaded the library yet.
Datum colcrypt_ddl_start(PG_FUNCTION_ARGS) {
  if (!CALLED_AS_EVENT_TRIGGER(fcinfo))
    ereport(ERROR, (errcode(ERRCODE_E_R_I_E_EVENT_TRIGGER_PROTOCOL_VIOLATED),
                    errmsg("colcrypt._ddl_start() is an event trigger")));
  const EventTriggerData* data = reinterpret_cast<EventTriggerData*>(fcinfo->context);
  // CREATE TABLE AS / SELECT INTO that began before this call loaded the
  // library (the utility hook gives every later one a frame): a frame until
  // its ddl_end, so that its rows are checked as they are stored as well.
  if (data->parsetree != nullptr && IsA(data->parsetree, CreateTableAsStmt)) {
    if (current_frame == nullptr) {
      const CreateTableAsStmt* ctas = reinterpret_cast<CreateTableAsStmt*>(data->parsetree);
      late_frame = TableFrame{};
      late_frame.kind = frame_kind(ctas);
      late_frame.into = ctas->into;
      late_frame_subxact = GetCurrentSubTransactionId();
      current_frame = &late_frame;
    }
    PG_RETURN_NULL();
  }
  Oid type;
  Oid check;
  if (data->parsetree == nullptr || !IsA(data->parsetree, AlterTableStmt) ||
      !guard_functions(type, check))
    PG_RETURN_NULL();
  AlterTableStmt* alter = reinterpret_cast<AlterTableStmt*>(data->parsetree);
  if (alter->relation == nullptr) PG_RETURN_NULL();
  const Oid relid = RangeVarGetRelid(alter->relation, NoLock, true);
  if (!OidIsValid(relid)) PG_RETURN_NULL();
  ListCell* lc;
  // A restore: the dump adds a NOT VALID sealed check after CREATE TABLE,
  // which already got one from the event trigger (validated: the table was
  // empty). The dump's would collide by name; the one in place is at least
  // as strong, so its ADD is dropped from the statement.
  const Oid sealed = sealed_function();
  foreach (lc, alter->cmds) {
    const AlterTableCmd* cmd = lfirst_node(AlterTableCmd, lc);
    if (cmd->subtype == AT_AddConstraint && OidIsValid(sealed) &&
        duplicate_sealed_check(relid, reinterpret_cast<const Constraint*>(cmd->def), sealed))
      alter->cmds = foreach_delete_current(alter->cmds, lc);
  }
  foreach (lc, alter->cmds) {
    const AlterTableCmd* cmd = lfirst_node(AlterTableCmd, lc);
    if (cmd->subtype != AT_AlterColumnType || cmd->name == nullptr) continue;
    const AttrNumber attnum = get_attnum(relid, cmd->name);
    if (attnum == InvalidAttrNumber) continue;
    Oid old_type;
    int32 old_typmod;
    Oid collation;
    get_atttypetypmodcoll(relid, attnum, &old_type, &old_typmod, &collation);
    if (getBaseTypeAndTypmod(old_type, &old_typmod) != type || old_typmod < 0) continue;
    const ColumnDef* def = reinterpret_cast<ColumnDef*>(cmd->def);
    Oid new_type;
    int32 new_typmod;
    typenameTypeIdAndMod(nullptr, def->typeName, &new_type, &new_typmod);
    if (getBaseTypeAndTypmod(new_type, &new_typmod) != type || new_typmod >= 0) continue;
    const colcrypt::pg::ColumnKey& column = colcrypt::pg::column_key(old_typmod);
    ereport(ERROR,
            (errcode(ERRCODE_DATATYPE_MISMATCH),
             errmsg("column \"%s\" would lose its colcrypt key", cmd->name),
             errdetail("The column is colcrypt.encrypted('%s','%s'); the new type has no key, so "
                       "plaintext written later would be refused and the binding forgotten.",
                       column.key_name, column.binding),
             errhint("Keep the type modifier: ALTER COLUMN %s TYPE "
                     "colcrypt.encrypted('%s','%s').",
                     quote_identifier(cmd->name), column.key_name, column.binding)));
  }
  PG_RETURN_NULL();
}

// Event trigger on ddl_command_end for CREATE TABLE, CREATE TABLE AS, SELECT
// INTO, ALTER TABLE and ALTER TYPE: adds the sealed checks the affected
// tables miss.
Datum colcrypt_ddl_end(PG_FUNCTION_ARGS) {
  if (!CALLED_AS_EVENT_TRIGGER(fcinfo))
    ereport(ERROR, (errcode(ERRCODE_E_R_I_E_EVENT_TRIGGER_PROTOCOL_VIOLATED),
                    errmsg("colcrypt._ddl_end() is an event trigger")));
  Oid type;
  Oid check;
  if (!guard_functions(type, check)) PG_RETURN_NULL();
  const Oid sealed = sealed_function();
  if (!OidIsValid(sealed)) PG_RETURN_NULL();
  if (SPI_connect() != SPI_OK_CONNECT) elog(ERROR, "SPI_connect failed");
  // The relations the command made or altered, and after ALTER TYPE ...
  // CASCADE the typed tables (CREATE TABLE ... OF) of the composite type,
  // which got or changed a column without a command of their own.
  if (SPI_execute(
          "WITH d AS (SELECT objid FROM pg_catalog.pg_event_trigger_ddl_commands() "
          "WHERE classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass) "
          "SELECT objid FROM d UNION "
          "SELECT t.oid FROM d JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) "
          "d.objid JOIN pg_catalog.pg_class t ON t.reloftype OPERATOR(pg_catalog.=) "
          "c.reltype WHERE c.relkind OPERATOR(pg_catalog.=) 'c'",
          true, 0) != SPI_OK_SELECT)
    elog(ERROR, "SPI_execute failed");
  List* relids = NIL;
  for (uint64 i = 0; i < SPI_processed; ++i) {
    bool isnull;
    const Datum d = SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1, &isnull);
    if (!isnull) relids = lappend_oid(relids, DatumGetObjectId(d));
  }
  const CommandTag tag = reinterpret_cast<EventTriggerData*>(fcinfo->context)->tag;
  const bool altered = tag == CMDTAG_ALTER_TABLE || tag == CMDTAG_ALTER_TYPE;
  // CREATE TABLE AS whose receiver checked every row it stored: the table it
  // made needs no validation scan.
  const bool from_query = tag == CMDTAG_CREATE_TABLE_AS || tag == CMDTAG_SELECT_INTO;
  const TableFrame* frame = current_frame;
  const Oid checked = from_query && frame != nullptr && frame->kind == FrameKind::Table &&
                              frame->complete
                          ? frame->relid
                          : InvalidOid;
  ListCell* lc;
  foreach (lc, relids) {
    const Oid relid = lfirst_oid(lc);
    ExistingRows rows = ExistingRows::Validate;
    if (altered) {
      List* tables = find_all_inheritors(relid, AccessShareLock, nullptr);
      if (!rewritten_now(tables) && !all_empty(tables)) rows = ExistingRows::NotValid;
    } else if (OidIsValid(checked) && relid == checked) {
      rows = ExistingRows::Checked;
    }
    add_sealed_checks(relid, type, sealed, rows);
  }
  if (from_query && frame == &late_frame) forget_late_frame();
  SPI_finish();
  PG_RETURN_NULL();
}

// Event trigger on table_rewrite: remembers the table, so that the sealed
// checks ddl_end adds after this ALTER TABLE validate the rewritten rows.
Datum colcrypt_table_rewrite(PG_FUNCTION_ARGS) {
  if (!CALLED_AS_EVENT_TRIGGER(fcinfo))
    ereport(ERROR, (errcode(ERRCODE_E_R_I_E_EVENT_TRIGGER_PROTOCOL_VIOLATED),
                    errmsg("colcrypt._table_rewrite() is an event trigger")));
  note_rewrite(DatumGetObjectId(
      DirectFunctionCall1(pg_event_trigger_table_rewrite_oid, PointerGetDatum(nullptr))));
  PG_RETURN_NULL();
}

// _key_grants_changed(): statement trigger on colcrypt.key_grants. Every
// backend (this one included) forgets its cached privileges when the change
// commits; this backend at its next command already.
Datum colcrypt_key_grants_changed(PG_FUNCTION_ARGS) {
  if (!CALLED_AS_TRIGGER(fcinfo)) elog(ERROR, "colcrypt._key_grants_changed is a trigger");
  CacheInvalidateRelcache(reinterpret_cast<TriggerData*>(fcinfo->context)->tg_relation);
  return PointerGetDatum(nullptr);
}
