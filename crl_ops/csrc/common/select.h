// Selection keys: the order of ranks_before (crl_math.h) as one unsigned integer per candidate,
// for the keys mining ranks by (squared distances and class probabilities, never negative).
//
// A non-negative float orders like its bit pattern read as an unsigned integer, so
//   smallest first:  (bits(key) << 32) | index
//   largest first:   (~bits(key) << 32) | index
// orders candidates exactly as ranks_before<Largest> does (key first, then the lower index), and
// two candidates never tie. A list of them is ordered by one integer comparison, which also stays
// a strict order for NaN keys (non-finite inputs, whose mined sets are unspecified).
#pragma once

#include <cstdint>
#include <cstring>

#include "common/crl_math.h"

namespace crl {

template <typename Key>
struct SelectionTraits;

template <>
struct SelectionTraits<float> {
  using Bits = uint32_t;
  using Composite = uint64_t;
};

template <>
struct SelectionTraits<double> {
  using Bits = uint64_t;
  using Composite = unsigned __int128;
};

template <typename Key>
using selection_key_t = typename SelectionTraits<Key>::Composite;

template <typename To, typename From>
CRL_HD To bit_copy(From value) {
  static_assert(sizeof(To) == sizeof(From), "bit_copy needs equal sizes");
  To out;
  std::memcpy(&out, &value, sizeof(To));
  return out;
}

// The selection key of candidate `index` (0 <= index < 2^31) with ranking key `key` >= 0.
template <bool Largest, typename Key>
CRL_HD selection_key_t<Key> selection_key(Key key, int32_t index) {
  using Bits = typename SelectionTraits<Key>::Bits;
  const Bits bits = bit_copy<Bits>(key);
  return (static_cast<selection_key_t<Key>>(Largest ? Bits(~bits) : bits) << 32) | static_cast<uint32_t>(index);
}

template <typename Key>
CRL_HD int32_t selected_index(selection_key_t<Key> selected) {
  return static_cast<int32_t>(static_cast<uint32_t>(selected));
}

template <bool Largest, typename Key>
CRL_HD Key selected_key(selection_key_t<Key> selected) {
  using Bits = typename SelectionTraits<Key>::Bits;
  const Bits bits = static_cast<Bits>(selected >> 32);
  return bit_copy<Key>(Largest ? Bits(~bits) : bits);
}

}  // namespace crl
