// Where colcrypt-keyd gets its master secret: a 32-byte key file, a password
// file, ENCRYPTION_MASTER_PASSWORD or an interactive prompt; never argv.
#pragma once
#include <optional>
#include <string>

#include "keyd/store.hpp"

namespace colcrypt::keyd {

constexpr const char* kPasswordEnvVar = "ENCRYPTION_MASTER_PASSWORD";

// Exactly 32 raw bytes in a regular file that group and others cannot
// access (InsecurePermissions otherwise; InvalidArgument for a bad size or a
// missing file).
MasterSecret read_master_key_file(const std::string& path);
// The file's content without one trailing newline; same permission rule.
MasterSecret read_password_file(const std::string& path);
// Takes the password from ENCRYPTION_MASTER_PASSWORD, then wipes the
// variable's value in place and removes it from the environment. nullopt
// when the variable is unset.
std::optional<MasterSecret> take_password_from_env();
// Scrubs ENCRYPTION_MASTER_PASSWORD even when another source is used.
void scrub_password_env();
// Asks on the terminal (stdin) without echo; twice when confirm is set.
// Throws InvalidArgument when the answers differ or are empty.
MasterSecret prompt_password(const std::string& prompt, bool confirm);

// The one choice of source, shared by colcrypt-keyd and colcrypt-keyctl's
// offline audit verify: --master-key-file, else --password-file, else the
// password taken from ENCRYPTION_MASTER_PASSWORD (env_password, consumed),
// else a prompt when stdin is a terminal. Throws InvalidArgument when both
// files are given or no source exists.
MasterSecret choose_master_secret(const std::string& master_key_file,
                                  const std::string& password_file,
                                  std::optional<MasterSecret>& env_password,
                                  const std::string& prompt, bool confirm);

}  // namespace colcrypt::keyd
