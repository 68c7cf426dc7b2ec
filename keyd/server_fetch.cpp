// colcrypt-keyd's request handlers for database peers: key fetches (primary,
// blocks of uses, versions, derived purposes) and denial reports; admin
// frames are checked here and handed to server_admin.cpp.
#include <algorithm>
#include <cstdio>
#include <exception>

#include "keyd/log.hpp"
#include "keyd/server_internal.hpp"

namespace colcrypt::keyd {

using nlohmann::json;

void Server::handle_frame(Connection& c, uint8_t type, std::vector<uint8_t>& body) {
  const std::string peer = peer_text(c.uid, c.pid);
  auto fail = [&](wire::FailureCode code, const std::string& message) {
    queue(c, wire::encode_failure(code, message));
  };
  try {
    switch (static_cast<wire::MsgType>(type)) {
      case wire::MsgType::FetchPrimary:
      case wire::MsgType::FetchPrimaryFor:
      case wire::MsgType::FetchPrimaryBlock:
      case wire::MsgType::FetchVersion:
      case wire::MsgType::FetchVersionFor:
        // Administering does not imply fetching (issue 10): keys go to --allow-uid peers only.
        if (!may_fetch(c.uid)) return refuse_fetch(c, type, body);
        break;
      default:
        break;
    }
    switch (static_cast<wire::MsgType>(type)) {
      case wire::MsgType::FetchPrimary:
      case wire::MsgType::FetchPrimaryFor:
      case wire::MsgType::FetchPrimaryBlock: {
        const bool block = static_cast<wire::MsgType>(type) == wire::MsgType::FetchPrimaryBlock;
        auto purpose = wire::FetchPurpose::Decrypt;
        uint32_t wanted = 1;  // a FetchPrimary(For) is charged one encryption
        std::string name = block ? wire::decode_fetch_primary_block(ByteView(body), wanted)
                           : static_cast<wire::MsgType>(type) == wire::MsgType::FetchPrimaryFor
                               ? wire::decode_fetch_primary_for(ByteView(body), purpose)
                               : wire::decode_fetch_primary(ByteView(body));
        wanted = std::min(wanted, config_.max_block_uses);
        // A standby reserves no uses: deterministic values and blind indexes
        // (SIV, HMAC: no random nonce to count) are keyed there for searches,
        // as lookups; an encryption is refused ("standby: encrypt on the primary").
        // A file key (colcrypt-file: a random nonce per file) is an encryption.
        if (store_.read_only() && (purpose == wire::FetchPurpose::Deterministic ||
                                   purpose == wire::FetchPurpose::BlindIndex)) {
          wanted = 0;
        }
        await_store([&] { return store_.find(name) != nullptr; }, false);
        if (const KeyRecord* k = store_.find(name)) {
          // Blocks are charged whole: one never exceeds 1/64 of the key's cap
          // (what exiting backends take with them stays small), but 1024 is
          // always allowed (small caps).
          const uint64_t share = std::max<uint64_t>(kMinBlockCeiling, k->max_uses_per_version / 64);
          wanted = static_cast<uint32_t>(std::min<uint64_t>(wanted, share));
        }
        json entry = {{"event", "fetch"},
                      {"op", block ? "primary-block" : "primary"},
                      {"uid", c.uid},
                      {"pid", c.pid},
                      {"key", name}};
        if (purpose != wire::FetchPurpose::Decrypt)
          entry["purpose"] = wire::fetch_purpose_name(purpose);
        const int64_t now = now_seconds();
        UseGrant grant;
        try {
          const uint32_t before = store_.find(name) ? store_.find(name)->primary_version : 0;
          grant = store_.charge_uses(name, wanted, now);
          if (grant.rotated) {
            publish_keys();
            const KeyRecord* k = store_.find(name);
            audit({{"event", "admin"},
                   {"op", "rotate"},
                   {"key", name},
                   {"reason", "usage-cap"},
                   {"result", "ok"},
                   {"from_version", before},
                   {"version", k->primary_version}});
            log_info("rotated key '" + name + "' to version " + std::to_string(k->primary_version) +
                     " (usage cap reached)");
          }
        } catch (const Error& e) {
          entry["result"] = errc_name(e.code());
          audit(entry);
          if (e.code() == Errc::KeyNotFound) {
            log_info("peer " + peer + " asked for unknown key '" + name + "'");
            return fail(wire::FailureCode::NotFound, "key '" + name + "' not found");
          }
          if (e.code() == Errc::KeyUnavailable) {
            log_warning("peer " + peer + " asked for unavailable key '" + name + "': " + e.what());
            return fail(wire::FailureCode::KeyUnavailable, e.what());
          }
          throw;
        }
        const KeyRecord* key = store_.find(name);
        wire::KeyReply reply;
        reply.id = key->id;
        reply.version = grant.version;
        // A grant that used up the cap was followed by a rotation: its version
        // is decrypt-only now, but the granted uses were charged to it and
        // remain valid (the version never exceeds its cap).
        reply.state = wire::KeyState::Active;
        reply.name = key->name;
        reply.key = unwrap_cached(*key, grant.version);
        if (block) {
          queue(c, wire::encode_key_grant(reply, static_cast<uint32_t>(grant.granted)));
        } else {
          queue(c, wire::encode_key_reply(reply));
        }
        entry["result"] = "ok";
        ++metrics_.fetches[key->name];
        entry["key_id"] = format_key_id(key->id);
        entry["version"] = grant.version;
        entry["granted"] = grant.granted;
        audit(entry);
        if (log_level() >= LogLevel::Debug)
          log_debug("peer " + peer + " fetched key '" + name + "' version " +
                    std::to_string(reply.version) + " (" + std::to_string(grant.granted) +
                    " uses)");
        return;
      }
      case wire::MsgType::FetchVersion:
      case wire::MsgType::FetchVersionFor: {
        KeyId id{};
        uint32_t version = 0;
        auto purpose = wire::FetchPurpose::Decrypt;
        if (static_cast<wire::MsgType>(type) == wire::MsgType::FetchVersion) {
          wire::decode_fetch_version(ByteView(body), id, version);
        } else {
          wire::decode_fetch_version_for(ByteView(body), id, version, purpose);
        }
        json entry = {{"event", "fetch"},
                      {"op", "version"},
                      {"uid", c.uid},
                      {"pid", c.pid},
                      {"key_id", format_key_id(id)},
                      {"version", version}};
        if (purpose != wire::FetchPurpose::Decrypt) {
          entry["purpose"] = wire::fetch_purpose_name(purpose);
        }
        await_store(
            [&] {
              const KeyRecord* k = store_.find(id);
              return k && k->find_version(version);
            },
            true);
        const KeyRecord* key = store_.find(id);
        if (!key) {
          entry["result"] = "KeyNotFound";
          audit(entry);
          log_info("peer " + peer + " asked for unknown key id " + format_key_id(id));
          return fail(wire::FailureCode::NotFound, "key " + format_key_id(id) + " not found");
        }
        entry["key"] = key->name;
        const KeyVersion* v = key->find_version(version);
        if (!v) {
          entry["result"] = "KeyNotFound";
          audit(entry);
          return fail(wire::FailureCode::NotFound,
                      "key '" + key->name + "' has no version " + std::to_string(version));
        }
        if (v->state == wire::KeyState::Disabled || v->state == wire::KeyState::Destroyed) {
          entry["result"] = std::string("KeyUnavailable: ") + wire::key_state_name(v->state);
          audit(entry);
          return fail(wire::FailureCode::KeyUnavailable, "key '" + key->name + "' version " +
                                                             std::to_string(version) + " is " +
                                                             wire::key_state_name(v->state));
        }
        const std::string name = key->name;
        if (purpose == wire::FetchPurpose::Deterministic ||
            purpose == wire::FetchPurpose::BlindIndex) {
          // The version now keys values no row count can see: keyd must
          // remember it (on disk) before the first such key leaves.
          bool first = false;
          try {
            first = store_.record_derivation(id, version, purpose, now_seconds());
          } catch (const Error& e) {
            entry["result"] = errc_name(e.code());
            audit(entry);
            log_error("cannot record that version " + std::to_string(version) + " of key '" + name +
                      "' keys " + wire::fetch_purpose_name(purpose) + " values: " + e.what());
            return fail(
                wire::FailureCode::Internal,
                "colcrypt-keyd could not record this use of key '" + name + "' (see its log)");
          }
          if (first) {
            audit({{"event", "derivation-pinned"},
                   {"key", name},
                   {"key_id", format_key_id(id)},
                   {"version", version},
                   {"purpose", wire::fetch_purpose_name(purpose)},
                   {"uid", c.uid},
                   {"pid", c.pid}});
            log_info("version " + std::to_string(version) + " of key '" + name + "' now keys " +
                     (purpose == wire::FetchPurpose::BlindIndex ? "blind indexes"
                                                                : "deterministic values") +
                     ": disabling or destroying it needs --force");
          }
          key = store_.find(id);  // record_derivation may have replaced the records
          v = key->find_version(version);
        }
        wire::KeyReply reply;
        reply.id = key->id;
        reply.version = version;
        reply.state = v->state;
        reply.name = key->name;
        reply.key = unwrap_cached(*key, version);
        queue(c, wire::encode_key_reply(reply));
        store_.record_use(key->id, now_seconds());
        entry["result"] = "ok";
        ++metrics_.fetches[key->name];
        audit(entry);
        if (log_level() >= LogLevel::Debug)
          log_debug("peer " + peer + " fetched key '" + key->name + "' version " +
                    std::to_string(version));
        return;
      }
      case wire::MsgType::DenialReport: {
        // Issue 4: the extension denied a database role the use of a key
        // (colcrypt.grant_key privileges): keep a record of the attempt.
        // Names come from the peer: no control characters into the log.
        auto printable = [](std::string s) {
          for (char& ch : s)
            if (static_cast<unsigned char>(ch) < 0x20 || ch == 0x7f) ch = '?';
          return s;
        };
        const wire::DenialReport r = wire::decode_denial_report(ByteView(body));
        ++metrics_.denials[{key_label(r.key_name), "sql"}];
        audit({{"event", "sql-denied"},
               {"key", printable(r.key_name)},
               {"privilege", printable(r.privilege)},
               {"role", printable(r.role)},
               {"database", printable(r.database)},
               {"uid", c.uid},
               {"pid", c.pid}});
        log_warning("denied: database role '" + printable(r.role) + "' may not " +
                    printable(r.privilege) + " with key '" + printable(r.key_name) +
                    "' (database '" + printable(r.database) + "', reported by peer " + peer + ")");
        queue(c, wire::encode_ack());
        return;
      }
      case wire::MsgType::Admin:
        if (!is_admin(c.uid)) {
          if (config_.sql_rotate && may_fetch(c.uid)) {
            // The one admin op a database peer may send (colcrypt.rotate_key).
            json request = json::parse(body.begin(), body.end(), nullptr, false);
            if (request.is_object() && request.value("op", "") == "rotate") {
              return handle_admin(c, body);
            }
          }
          audit({{"event", "admin-denied"}, {"uid", c.uid}, {"pid", c.pid}});
          log_warning("denied administration to peer " + peer);
          return fail(wire::FailureCode::Denied,
                      "uid " + std::to_string(c.uid) + " may not administer colcrypt-keyd");
        }
        return handle_admin(c, body);
      default: {
        char hex[8];
        std::snprintf(hex, sizeof hex, "0x%02x", type);
        log_info("peer " + peer + " sent unknown message type " + hex);
        return fail(wire::FailureCode::BadRequest, std::string("unknown message type ") + hex);
      }
    }
  } catch (const Error& e) {
    if (e.code() == Errc::ProtocolError) {
      // A frame that parsed but whose body did not: answer, keep the connection.
      return fail(wire::FailureCode::BadRequest, std::string("malformed request: ") + e.what());
    }
    log_error("request from peer " + peer + " failed: " + e.what());
    return fail(failure_code(e.code()), "internal error in colcrypt-keyd (see its log)");
  } catch (const std::exception& e) {
    // Nothing a peer sends may take the daemon down.
    log_error("request from peer " + peer + " failed: " + e.what());
    return fail(wire::FailureCode::Internal, "internal error in colcrypt-keyd (see its log)");
  }
}

SecretBytes Server::unwrap_cached(const KeyRecord& key, uint32_t version) {
  const KeyVersion* v = key.find_version(version);
  // Only versions that may be served come from the cache; the store decides
  // (and refuses) everything else: unknown, destroyed, not authenticating.
  const bool servable =
      v && v->state != wire::KeyState::Disabled && v->state != wire::KeyState::Destroyed;
  if (servable) {
    const ByteView cached = unwrapped_.find(key.id, version, ByteView(v->wrapped));
    if (!cached.empty()) return SecretBytes(cached);
  }
  SecretBytes bytes = store_.unwrap(key, version);
  if (servable) unwrapped_.insert(key.id, version, ByteView(v->wrapped), bytes.view());
  return bytes;
}

void Server::refuse_fetch(Connection& c, uint8_t type, const std::vector<uint8_t>& body) {
  json entry = {{"event", "fetch-denied"}, {"uid", c.uid}, {"pid", c.pid}};
  // What was asked for, for the audit trail (a malformed body throws
  // ProtocolError: a BadRequest, as for any peer).
  switch (static_cast<wire::MsgType>(type)) {
    case wire::MsgType::FetchPrimary:
      entry["op"] = "primary";
      entry["key"] = wire::decode_fetch_primary(ByteView(body));
      break;
    case wire::MsgType::FetchPrimaryFor: {
      auto purpose = wire::FetchPurpose::Decrypt;
      entry["op"] = "primary";
      entry["key"] = wire::decode_fetch_primary_for(ByteView(body), purpose);
      entry["purpose"] = wire::fetch_purpose_name(purpose);
      break;
    }
    case wire::MsgType::FetchPrimaryBlock: {
      uint32_t wanted = 0;
      entry["op"] = "primary-block";
      entry["key"] = wire::decode_fetch_primary_block(ByteView(body), wanted);
      break;
    }
    default: {
      KeyId id{};
      uint32_t version = 0;
      auto purpose = wire::FetchPurpose::Decrypt;
      if (static_cast<wire::MsgType>(type) == wire::MsgType::FetchVersion) {
        wire::decode_fetch_version(ByteView(body), id, version);
      } else {
        wire::decode_fetch_version_for(ByteView(body), id, version, purpose);
      }
      entry["op"] = "version";
      entry["key_id"] = format_key_id(id);
      entry["version"] = version;
      if (const KeyRecord* key = store_.find(id)) entry["key"] = key->name;
      break;
    }
  }
  ++metrics_.denials[{key_label(entry.value("key", "")), "peer"}];
  audit(entry);
  log_warning("denied a key fetch to peer " + peer_text(c.uid, c.pid) +
              " (not on --allow-uid; administering does not imply fetching)");
  queue(c, wire::encode_failure(wire::FailureCode::Denied,
                                "uid " + std::to_string(c.uid) +
                                    " may not fetch keys from colcrypt-keyd (not on its "
                                    "--allow-uid list)"));
}

}  // namespace colcrypt::keyd
