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

UnwrappedKeys::UnwrappedKeys(size_t capacity)
    : slab_(capacity == 0 ? size_t{1} : capacity * kKeySize), slots_(capacity == 0 ? 1 : capacity) {
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
  return {slab_.data() + it->second * kKeySize, kKeySize};
}

void UnwrappedKeys::insert(const KeyId& id, uint32_t version, ByteView wrapped, ByteView key) {
  if (key.size != kKeySize) throw Error(Errc::InvalidArgument, "cached key of the wrong size");
  if (wrapped.empty()) return;  // nothing to check a later fetch against
  const Ref ref{id, version};
  size_t at;
  if (auto it = index_.find(ref); it != index_.end()) {
    at = it->second;
  } else {
    at = next_;
    next_ = (next_ + 1) % slots_.size();
    if (slots_[at].used) {
      index_.erase(slots_[at].ref);
      wipe(at);
    }
    index_.emplace(ref, at);
  }
  Slot& slot = slots_[at];
  slot.ref = ref;
  slot.wrapped.assign(wrapped.data, wrapped.data + wrapped.size);
  slot.used = true;
  std::memcpy(slab_.data() + at * kKeySize, key.data, kKeySize);
}

void UnwrappedKeys::wipe(size_t slot) noexcept {
  secure_zero(slab_.data() + slot * kKeySize, kKeySize);
  slots_[slot].used = false;
  slots_[slot].wrapped.clear();
}

void UnwrappedKeys::clear() noexcept {
  if (index_.empty()) return;
  secure_zero(slab_.data(), slab_.size());
  for (Slot& s : slots_) {
    s.used = false;
    s.wrapped.clear();
  }
  index_.clear();
  next_ = 0;
}

}  // namespace colcrypt::keyd
