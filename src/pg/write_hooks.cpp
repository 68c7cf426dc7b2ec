// The hooks that refuse pending plaintext in a statement's own error before
// the sealed CHECK constraints (ddl_triggers.cpp) would: the planner hook
// wraps require_sealed() around values stored in columns without a key
// (INSERT/UPDATE/MERGE, CREATE TABLE AS, materialized views, which take no
// constraints), the utility hook marks COPY FROM and CREATE TABLE AS while
// they run, and the executor-run hook checks every row CREATE TABLE AS
// stores. docs/columns.md describes the design.

// postgres.h must come first: keep clang-format from sorting it.
// clang-format off
// Some server headers (spinlocks, via SPI) still use `register`, which C++17
// removed: accept it in them only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wregister"
extern "C" {
#include "postgres.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "executor/executor.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "nodes/nodeFuncs.h"
#include "nodes/parsenodes.h"
#include "nodes/plannodes.h"
#include "optimizer/planner.h"
#include "parser/parsetree.h"
#include "tcop/pquery.h"
#include "tcop/utility.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
}
#pragma GCC diagnostic pop
// clang-format on

#include "pg/columns.hpp"
#include "pg/columns_internal.hpp"

using colcrypt::pg::check_stored;
using colcrypt::pg::current_frame;
using colcrypt::pg::forget_late_frame;
using colcrypt::pg::FrameKind;
using colcrypt::pg::guard_functions;
using colcrypt::pg::holds_encrypted;
using colcrypt::pg::late_frame;
using colcrypt::pg::sealed_check_name;
using colcrypt::pg::TableFrame;

namespace {

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

SubTransactionId late_frame_subxact = InvalidSubTransactionId;

FrameKind frame_kind(const CreateTableAsStmt* stmt) {
  return stmt->objtype == OBJECT_TABLE && !stmt->into->skipData ? FrameKind::Table
                                                                : FrameKind::Other;
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
  const RangeVar* rel =
      r->frame != nullptr && r->frame->into != nullptr ? r->frame->into->rel : nullptr;
  const Oid relid = rel != nullptr
                        ? get_relname_relid(rel->relname, RangeVarGetCreationNamespace(rel))
                        : InvalidOid;
  if (r->frame != nullptr) r->frame->relid = relid;
  r->table = OidIsValid(relid)
                 ? quote_qualified_identifier(get_namespace_name(get_rel_namespace(relid)),
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
  if (!into_relation ||
      (frame != nullptr ? frame->kind == FrameKind::Other : query->instrument_options == 0)) {
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

TableFrame* current_frame = nullptr;
TableFrame late_frame;

// A frame for a CREATE TABLE AS / SELECT INTO that began before the library
// was loaded (see colcrypt_ddl_start), unless the statement has one.
void begin_late_frame(const CreateTableAsStmt* ctas) {
  if (current_frame != nullptr) return;
  late_frame = TableFrame{};
  late_frame.kind = frame_kind(ctas);
  late_frame.into = ctas->into;
  late_frame_subxact = GetCurrentSubTransactionId();
  current_frame = &late_frame;
}

// A late frame ends with its statement's ddl_end, or when its transaction or
// subtransaction does (an error before).
void forget_late_frame() {
  if (current_frame == &late_frame) current_frame = late_frame.previous;
  late_frame_subxact = InvalidSubTransactionId;
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
