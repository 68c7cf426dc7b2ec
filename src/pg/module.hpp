// What src/pg/module.cpp (module init, GUCs, callbacks) offers the other
// Postgres-facing files. Postgres-free declarations.
#pragma once
#include "pg/key_cache.hpp"

namespace colcrypt::pg {

// Called by every SQL function that needs a key, outside the guarded part:
// makes sure this process wipes its key cache on exit, and snapshots the GUCs.
KeydSettings prepare_key_access();

}  // namespace colcrypt::pg
