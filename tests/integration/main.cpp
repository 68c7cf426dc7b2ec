// The integration tests' runner. They run as root: the sandboxes they start
// run postgres as the postgres user and keyd as root (scripts/sandbox.sh).
#define CATCH_CONFIG_MAIN
#define CATCH_CONFIG_EXTERNAL_INTERFACES
#include <catch2/catch.hpp>

#include "harness.hpp"

namespace {

// Tells the harness about failed assertions, so that a sandbox torn down after
// one prints the tails of its keyd and postgres logs.
struct FailureListener : Catch::TestEventListenerBase {
  using TestEventListenerBase::TestEventListenerBase;
  bool assertionEnded(const Catch::AssertionStats& stats) override {
    if (!stats.assertionResult.isOk()) colcrypt::test::record_failure();
    return true;
  }
};

}  // namespace

CATCH_REGISTER_LISTENER(FailureListener)
