// What src/pg/module.cpp (module init, GUCs, callbacks) offers the other
// Postgres-facing files. Postgres-free declarations.
#pragma once
#include "pg/key_cache.hpp"

namespace colcrypt::pg {

// Called by every SQL function that needs a key, outside the guarded part:
// makes sure this process wipes its key cache on exit, and snapshots the GUCs.
KeydSettings prepare_key_access();

// Raises 54000 unless a plaintext of this size can be sealed into a value
// that Postgres can still print: pg_dump and COPY use the text form
// ("colcrypt:" + base64, a third larger), so a value that only fits in binary
// would make the table impossible to dump. The limit is about 768 MiB.
void check_sealable_size(size_t plaintext_size);

}  // namespace colcrypt::pg
