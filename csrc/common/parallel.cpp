#include "common/parallel.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace hm {
namespace {

thread_local bool t_inside_pool = false;

// One parallel_for call. Workers hold it by shared_ptr, so a worker that wakes after the job is
// over only finds its counters exhausted and never touches the caller's (gone) function.
struct Job {
  const std::function<void(int64_t)>* fn;
  int64_t chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex mutex;
  std::condition_variable finished;
};

class ThreadPool {
 public:
  explicit ThreadPool(int workers) {
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this] { worker_loop(); });
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }
  int size() const { return static_cast<int>(threads_.size()) + 1; }

  // One job at a time; a concurrent caller (another Python thread) gets false and runs inline.
  // Returns once every chunk has run: it does not wait for workers that have not woken up yet,
  // which on an oversubscribed machine would cost a scheduler delay per call.
  bool try_run(int64_t chunks, const std::function<void(int64_t)>& chunk_fn) {
    std::unique_lock<std::mutex> run_lock(run_mutex_, std::try_to_lock);
    if (!run_lock.owns_lock()) return false;
    auto job = std::make_shared<Job>();
    job->fn = &chunk_fn;
    job->chunks = chunks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      current_ = job;
      ++generation_;
    }
    wake_.notify_all();
    work_on(*job);
    {
      std::unique_lock<std::mutex> lock(job->mutex);
      job->finished.wait(lock, [&] { return job->done.load() == job->chunks; });
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (current_ == job) current_.reset();
    }
    if (job->error) std::rethrow_exception(job->error);
    return true;
  }

 private:
  static void work_on(Job& job) {
    t_inside_pool = true;
    for (int64_t c; (c = job.next.fetch_add(1)) < job.chunks;) {
      if (!job.failed.load()) {
        try {
          (*job.fn)(c);
        } catch (...) {
          std::lock_guard<std::mutex> lock(job.mutex);
          if (!job.error) job.error = std::current_exception();
          job.failed.store(true);  // remaining chunks are counted but not run
        }
      }
      if (job.done.fetch_add(1) + 1 == job.chunks) {
        std::lock_guard<std::mutex> lock(job.mutex);
        job.finished.notify_all();
      }
    }
    t_inside_pool = false;
  }

  void worker_loop() {
    uint64_t seen = 0;
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stopping_ || generation_ != seen; });
        if (stopping_) return;
        seen = generation_;
        job = current_;
      }
      if (job) work_on(*job);
    }
  }

  std::vector<std::thread> threads_;
  std::mutex run_mutex_, mutex_;
  std::condition_variable wake_;
  std::shared_ptr<Job> current_;
  uint64_t generation_ = 0;
  bool stopping_ = false;
};

// The pool is shared: each parallel_for call holds its own reference for as long as it runs, so a
// set_num_threads from another thread (which replaces the pool on the next call) never frees the
// pool under a running call; the last holder destroys it. The global slot is heap-allocated and
// never freed: joining worker threads from a static destructor at exit can deadlock.
std::mutex g_pool_mutex;
std::shared_ptr<ThreadPool>* g_pool = new std::shared_ptr<ThreadPool>();
int g_num_threads = 0;

// fork() copies only the forking thread. Holding g_pool_mutex across the fork keeps the child
// from inheriting it locked by a thread that does not exist there; the child then drops the
// parent's pool (its workers are gone, and joining them would hang) without destroying it, and
// builds a fresh one on its next parallel call. Running calls in the parent are unaffected.
void before_fork() { g_pool_mutex.lock(); }
void after_fork_in_parent() { g_pool_mutex.unlock(); }
void after_fork_in_child() {
  new std::shared_ptr<ThreadPool>(std::move(*g_pool));  // leaked on purpose: see above
  g_pool->reset();
  g_pool_mutex.unlock();
}
[[maybe_unused]] const bool g_fork_handlers_registered =
    pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child) == 0;

int default_threads() {
  unsigned n = std::thread::hardware_concurrency();
  return n ? static_cast<int>(n) : 1;
}

std::shared_ptr<ThreadPool> pool_for(int threads) {
  std::shared_ptr<ThreadPool> replaced;  // destroyed after the lock is released (joins its workers)
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (!*g_pool || (*g_pool)->size() != threads) {
    replaced = std::move(*g_pool);
    *g_pool = std::make_shared<ThreadPool>(threads - 1);
  }
  return *g_pool;
}

}  // namespace

void set_num_threads(int n) {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  g_num_threads = std::max(1, n);
}

int get_num_threads() {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (g_num_threads <= 0) g_num_threads = default_threads();
  return g_num_threads;
}

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int threads = get_num_threads();
  if (threads <= 1 || n <= grain || t_inside_pool) {
    fn(0, n);
    return;
  }
  // A few chunks per thread balance uneven rows without paying much per chunk.
  const int64_t max_chunks = static_cast<int64_t>(threads) * 4;
  const int64_t chunks = std::min<int64_t>(max_chunks, (n + grain - 1) / grain);
  const int64_t step = (n + chunks - 1) / chunks;
  const std::function<void(int64_t)> chunk_fn = [&](int64_t c) {
    const int64_t begin = c * step, end = std::min(n, begin + step);
    if (begin < end) fn(begin, end);
  };
  const std::shared_ptr<ThreadPool> pool = pool_for(threads);
  if (!pool->try_run(chunks, chunk_fn)) fn(0, n);
}

}  // namespace hm
