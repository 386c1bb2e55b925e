// A small persistent thread pool. hetmerge does not use OpenMP, so that it never fights the
// OpenMP runtime torch brings into the same process (two runtimes oversubscribe the cores).
#pragma once
#include <cstdint>
#include <functional>

namespace hm {

void set_num_threads(int n);  // n >= 1
int get_num_threads();

// Calls fn(begin, end) on disjoint chunks covering [0, n), each at least `grain` long (except the
// last), spread over the pool. Runs inline when n is small, when one thread is set, or when called
// from inside another parallel_for. Exceptions thrown by fn are rethrown in the caller.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace hm
