// What the harnesses share: LoRABatch-like metadata, aligned storage, failure counting.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

// The address check (test_cuda_emulation.py builds the harnesses with AddressSanitizer too): the slack of the aligned
// storages below is poisoned, so that an access past a buffer's n elements stops the run as a GPU's illegal address
// would, instead of reading the storage's zeros.
#if defined(__SANITIZE_ADDRESS__)
#define LK_ADDRESS_CHECK 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define LK_ADDRESS_CHECK 1
#endif
#endif
#ifdef LK_ADDRESS_CHECK
#include <sanitizer/asan_interface.h>
#endif

struct Meta {
  std::vector<int32_t> ids, sorted, starts, counts;
};
Meta make_meta(int M, int L, std::mt19937& rng, const std::string& dist) {
  Meta m;
  m.ids.resize(M);
  for (int i = 0; i < M; ++i) {
    if (dist == "distinct") m.ids[i] = i % L;
    else if (dist == "mixed_base") m.ids[i] = int(rng() % (L + 1)) - 1;
    else if (dist == "all_base") m.ids[i] = -1;
    else m.ids[i] = int(rng() % std::min(2, L));  // "two": everything on slots 0 and 1
  }
  m.counts.assign(L, 0); m.starts.assign(L, 0);
  for (int i = 0; i < M; ++i) if (m.ids[i] >= 0) m.counts[m.ids[i]]++;
  int acc = 0;
  for (int s = 0; s < L; ++s) { m.starts[s] = acc; acc += m.counts[s]; }
  for (int s = 0; s < L; ++s) for (int i = 0; i < M; ++i) if (m.ids[i] == s) m.sorted.push_back(i);
  for (int i = 0; i < M; ++i) if (m.ids[i] < 0) m.sorted.push_back(i);
  m.sorted.shrink_to_fit();  // no capacity past the M ids, where a read past them would go unseen
  return m;
}

int failures = 0;
#define EXPECT(cond, ...)                 \
  do {                                    \
    if (!(cond) && failures++ < 20) {     \
      std::printf("FAIL: " __VA_ARGS__);  \
      std::printf("\n");                  \
    }                                     \
  } while (0)

// n elements of storage from a 16-byte boundary on (the kernels take 16-byte loads only from aligned rows); under
// the address check the storage around them is poisoned.
template <typename T>
T* aligned16_in(std::vector<T>& storage, size_t n) {
#ifdef LK_ADDRESS_CHECK
  ASAN_UNPOISON_MEMORY_REGION(storage.data(), storage.size() * sizeof(T));  // reused: assign writes all of it
#endif
  storage.assign(n + 16, T(0));
  const uintptr_t p = reinterpret_cast<uintptr_t>(storage.data());
  T* const aligned = reinterpret_cast<T*>((p + 15) / 16 * 16);
#ifdef LK_ADDRESS_CHECK
  ASAN_POISON_MEMORY_REGION(storage.data(), size_t(aligned - storage.data()) * sizeof(T));
  ASAN_POISON_MEMORY_REGION(aligned + n, size_t(storage.data() + storage.size() - (aligned + n)) * sizeof(T));
#endif
  return aligned;
}

// Under the address check, the elements of `rows` rows of `ld` elements at `base` past their first `used`: a view's
// padding, which is no element of it (a kernel that reads there would read past the tensor's last row's end too). The
// bytes of a granule (8) that also holds the next row's first elements stay addressable.
template <typename T>
void poison_row_padding(const T* base, int64_t rows, int64_t ld, int64_t used) {
#ifdef LK_ADDRESS_CHECK
  for (int64_t row = 0; used < ld && row < rows; ++row) {
    ASAN_POISON_MEMORY_REGION(base + row * ld + used, size_t(ld - used) * sizeof(T));
  }
#else
  (void)base, (void)rows, (void)ld, (void)used;
#endif
}

// A split of k elements into `splits` ranges of `per` (the last one shorter), `per` a multiple of `unit`: every
// element in one range, no range empty (k = 0: one range), at most max_splits ranges.
inline bool split_covers(int64_t k, int64_t splits, int64_t per, int64_t unit, int64_t max_splits) {
  return splits >= 1 && splits <= max_splits && per > 0 && per % unit == 0 && splits * per >= k &&
         (splits - 1) * per < std::max<int64_t>(k, 1);
}
