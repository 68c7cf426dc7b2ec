#include "keyd/unwrapped_keys.hpp"

#include <cstring>

#include "core/error.hpp"

namespace colcrypt::keyd {

size_t UnwrappedKeys::RefHash::operator()(const Ref& r) const noexcept {
  // Key ids are random: their first bytes are a good hash already.
  uint64_t h = 0;
  std::memcpy(&h, r.id.data(), sizeof h);
  return static_cast<size_t>(h ^ (uint64_t{r.version} * 0x9e3779b97f4a7c15ull));
}

UnwrappedKeys::UnwrappedKeys(size_t capacity) : slots_(capacity == 0 ? 1 : capacity) {
  index_.reserve(slots_.size());
}

ByteView UnwrappedKeys::find(const KeyId& id, uint32_t version, ByteView wrapped) const {
  auto it = index_.find(Ref{id, version});
  if (it == index_.end()) return {};
  const Slot& slot = slots_[it->second];
  if (wrapped.empty() || slot.wrapped.size() != wrapped.size ||
      std::memcmp(slot.wrapped.data(), wrapped.data, wrapped.size) != 0) {
    return {};
  }
  return slot.key.view();
}

void UnwrappedKeys::insert(const KeyId& id, uint32_t version, ByteView wrapped, ByteView key) {
  if (key.size != kKeySize) throw Error(Errc::InvalidArgument, "cached key of the wrong size");
  if (wrapped.empty()) return;  // nothing to check a later fetch against
  const Ref ref{id, version};
  // Everything that may throw (bad_alloc) comes before the index names the
  // slot: a failed insert leaves no index entry without its key.
  std::vector<uint8_t> wrapped_copy(wrapped.data, wrapped.data + wrapped.size);
  size_t at;
  if (auto it = index_.find(ref); it != index_.end()) {
    at = it->second;
  } else {
    at = next_;
    if (!slots_[at].key.empty()) {
      if (auto old = index_.find(slots_[at].ref); old != index_.end() && old->second == at)
        index_.erase(old);
      wipe(at);
    }
    slots_[at].key = keys_.acquire();
    index_.emplace(ref, at);
    next_ = (next_ + 1) % slots_.size();
  }
  Slot& slot = slots_[at];
  slot.ref = ref;
  slot.wrapped = std::move(wrapped_copy);
  std::memcpy(slot.key.data(), key.data, kKeySize);
}

void UnwrappedKeys::wipe(size_t slot) noexcept {
  slots_[slot].key = SecretSlab::Slot();  // wiped
  slots_[slot].wrapped.clear();
}

void UnwrappedKeys::clear() noexcept {
  if (index_.empty()) return;
  for (size_t i = 0; i < slots_.size(); ++i) wipe(i);
  index_.clear();
  next_ = 0;
}

}  // namespace colcrypt::keyd
