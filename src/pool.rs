//! The crate's one thread pool.
//!
//! Its size comes from [`set_num_threads`] (the Python package reads `ATTNKIT_NUM_THREADS`, then
//! `OMP_NUM_THREADS`, at import), at most [`MAX_THREADS`]; by default it is the number of CPUs the
//! process may use. The pool is built lazily, rebuilt when the size changes, and rebuilt in a child
//! process after `fork` (the parent's worker threads do not exist there). Kernels receive a [`Par`]
//! explicitly, which also carries the call's [`Stop`] request; nothing reads a hidden global inside
//! a kernel.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use rayon::ThreadPool;

/// How a kernel may run: on the calling thread or on a pool, and whether it can be told to stop.
#[derive(Clone, Copy)]
pub struct Par<'a> {
    pool: Option<&'a ThreadPool>,
    stop: Option<&'a Stop<'a>>,
}

impl<'a> Par<'a> {
    /// On the calling thread, never stopped.
    pub const SEQ: Par<'static> = Par { pool: None, stop: None };

    /// On `pool`, never stopped.
    pub fn on(pool: &'a ThreadPool) -> Self {
        Par { pool: Some(pool), stop: None }
    }

    /// On `pool` (or the calling thread), stopping early once `stop` says so.
    pub fn new(pool: Option<&'a ThreadPool>, stop: Option<&'a Stop<'a>>) -> Self {
        Par { pool, stop }
    }

    /// The same, on the calling thread only.
    pub fn sequential(self) -> Self {
        Par { pool: None, ..self }
    }

    /// Whether the call has been told to stop: its outputs are then discarded, so the work left
    /// may be skipped. Kernels ask between tasks and between blocks of a long task; it costs an
    /// atomic load, and a clock read on the calling thread.
    #[inline]
    pub fn stopped(self) -> bool {
        self.stop.is_some_and(Stop::requested)
    }

    /// The threads this may run on.
    pub fn threads(self) -> usize {
        self.pool.map_or(1, ThreadPool::current_num_threads)
    }

    /// Runs `f` on every task, each once, and returns when all are done.
    ///
    /// On a pool, the calling thread takes tasks from the first at once while `threads − 1`
    /// helpers are sent to the pool to join it, each taking the next task left as it comes free.
    /// The call never waits for a helper that has not started: a thread asleep in the pool takes
    /// 9–100 µs to wake on a busy machine, and none may run at all while another library's
    /// threads spin on the other cores (right after a BLAS call, say), so the calling thread
    /// does every task no helper has taken, then waits only for the helpers that are running one
    /// (each within a task of it). A helper that starts after that finds the call closed and
    /// leaves without touching its memory (see `Call`). After its work a helper stays awake
    /// for up to `LINGER` (1 ms), spinning, so that the next call of a loop (a decode step per
    /// token) finds it ready instead of asleep; it stops as soon as a call starts. OpenMP
    /// runtimes do the same, for longer by default. Which thread runs a task never changes its
    /// result.
    pub fn for_each<T: Send>(self, tasks: &mut [T], f: impl Fn(&mut T) + Sync) {
        let sequential = |tasks: &mut [T]| {
            for task in tasks {
                if self.stopped() {
                    return;
                }
                f(task);
            }
        };
        let Some(pool) = self.pool else {
            return sequential(tasks);
        };
        let helpers = pool.current_num_threads().min(tasks.len()).saturating_sub(1);
        if helpers == 0 {
            return sequential(tasks);
        }
        // Each task behind its own lock, taken once by whichever thread draws its index.
        let tasks: Vec<Mutex<&mut T>> = tasks.iter_mut().map(Mutex::new).collect();
        let next = AtomicUsize::new(0);
        let work = || {
            while let Some(task) = tasks.get(next.fetch_add(1, Ordering::Relaxed)) {
                if self.stopped() {
                    break; // the tasks left are skipped: the call's outputs are discarded
                }
                // A task that panicked poisons only its own lock; the panic reaches the caller.
                f(&mut task.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
            }
        };
        let call = Arc::new(Call::default());
        // Helpers still lingering from the last call stop, and take these tasks at once.
        let number = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
        let work_ref: &(dyn Fn() + Sync) = &work;
        // SAFETY: only the lifetime is erased. A helper calls `work` only after `Call::enter`
        // succeeds, and `Close` (below, also when this thread unwinds) closes the call and waits
        // until every helper that entered has left before `work` and what it borrows are dropped.
        let work_ptr = Work(unsafe {
            std::mem::transmute::<&(dyn Fn() + Sync), &'static (dyn Fn() + Sync)>(work_ref) as *const _
        });
        for _ in 0..helpers {
            let (call, work_ptr) = (Arc::clone(&call), work_ptr);
            pool.spawn(move || {
                if call.enter() {
                    // SAFETY: entered, so the call is open and waits for this helper to leave.
                    let run = std::panic::AssertUnwindSafe(|| unsafe { (*work_ptr.get())() });
                    if let Err(panic) = std::panic::catch_unwind(run) {
                        call.panic.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(panic);
                    }
                    call.leave();
                }
                linger(number);
            });
        }
        {
            let _close = Close(&call);
            work();
        }
        let panic = call.panic.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(panic) = panic {
            std::panic::resume_unwind(panic);
        }
    }
}

/// What a call of [`Par::for_each`] shares with its helpers, which may outlive it: whether it is
/// still open, how many helpers are inside it, and the first panic of one.
///
/// A helper enters by counting itself in, then checking that the call is open; the call closes
/// by marking itself closed, then waiting until no helper is inside. Both steps are sequentially
/// consistent, so either the helper sees the call closed (and leaves at once) or the call sees
/// the helper inside (and waits for it).
#[derive(Default)]
struct Call {
    inside: AtomicUsize,
    closed: AtomicBool,
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

impl Call {
    /// Counts a helper in; false (and counted out again) if the call has closed.
    fn enter(&self) -> bool {
        self.inside.fetch_add(1, Ordering::SeqCst);
        if self.closed.load(Ordering::SeqCst) {
            self.leave();
            return false;
        }
        true
    }

    fn leave(&self) {
        self.inside.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Closes a call when dropped (at its end, or while its thread unwinds), then waits for the
/// helpers inside it: spinning for up to `LINGER` (they finish within about a task, and
/// spinning keeps the calling thread awake), then yielding the core.
struct Close<'a>(&'a Call);

impl Drop for Close<'_> {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::SeqCst);
        let busy = || self.0.inside.load(Ordering::SeqCst) > 0;
        spin_while(busy);
        while busy() {
            std::thread::yield_now();
        }
    }
}

/// A call's work as a helper receives it, its lifetime erased (see [`Par::for_each`]).
#[derive(Clone, Copy)]
struct Work(*const (dyn Fn() + Sync));

// SAFETY: the work is `Sync`, and helpers call it only while its call waits for them.
unsafe impl Send for Work {}

impl Work {
    /// The pointer (a method, so that a closure captures the whole `Work`, which is `Send`).
    fn get(self) -> *const (dyn Fn() + Sync) {
        self.0
    }
}

/// Calls of [`Par::for_each`] on a pool so far: a lingering helper stops when it moves.
static CALLS: AtomicUsize = AtomicUsize::new(0);

/// How long a helper stays awake after a call, ready for the next: longer than the Python
/// between the calls of a model's layer takes, short enough that other work on the machine
/// barely notices (OpenMP runtimes spin longer by default). 100 µs let the helper fall asleep
/// inside MiniLM's layers: 1 ms made its encode at 2 threads 5% faster (interleaved A/B, float32
/// and bfloat16) for no more CPU time.
const LINGER: Duration = Duration::from_millis(1);

/// Spins until the next call starts or [`LINGER`] has passed, whichever comes first.
fn linger(call: usize) {
    spin_while(|| CALLS.load(Ordering::Relaxed) == call);
}

/// Spins while `busy` holds, for at most [`LINGER`].
fn spin_while(busy: impl Fn() -> bool) {
    let start = Instant::now();
    while busy() && start.elapsed() < LINGER {
        std::hint::spin_loop();
    }
}

/// A call's stop request: set when the calling thread's `poll` (run only on that thread, every
/// [`POLL_INTERVAL`] or less often, see [`Stop::requested`]) says the call must end, as when
/// Python has a `KeyboardInterrupt` to raise. Any thread working for the call sees it.
pub struct Stop<'a> {
    requested: AtomicBool,
    caller: ThreadId,
    start: Instant,
    /// Nanoseconds from `start` to the next poll.
    next: AtomicU64,
    poll: &'a (dyn Fn() -> bool + Sync),
}

/// How often the calling thread polls, at most: a signal stops a call within about this long
/// (plus the longest block of work between two checks, a few milliseconds).
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// The longest interval between polls, however long a poll takes.
const MAX_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// The interval the last poll chose, in nanoseconds: the next call's first poll comes after it,
/// so that calls shorter than it, made while other Python threads run, never wait for the GIL.
/// (Only Python's main thread polls.)
static POLL_EVERY: AtomicU64 = AtomicU64::new(POLL_INTERVAL.as_nanos() as u64);

impl<'a> Stop<'a> {
    /// A request for calls made from this thread, polled with `poll`.
    pub fn new(poll: &'a (dyn Fn() -> bool + Sync)) -> Self {
        Stop {
            requested: AtomicBool::new(false),
            caller: std::thread::current().id(),
            start: Instant::now(),
            next: AtomicU64::new(POLL_EVERY.load(Ordering::Relaxed)),
            poll,
        }
    }

    /// Whether the call must stop, polling first when this is the calling thread and the next
    /// poll is due.
    ///
    /// A poll takes the GIL, which costs nothing while no other Python thread runs, but waits up
    /// to Python's switch interval (5 ms) while one does: waiting 5 ms every 20 ms slowed such a
    /// call by a third. So the next poll comes twenty times the last one's duration later, at
    /// least [`POLL_INTERVAL`] and at most `MAX_POLL_INTERVAL` (100 ms), and so does the next call's first
    /// poll: polling costs at most about 5% of the calling thread's time, and a signal still
    /// stops the call within about 100 ms.
    pub fn requested(&self) -> bool {
        if self.requested.load(Ordering::Relaxed) {
            return true;
        }
        if std::thread::current().id() == self.caller {
            let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
            let now = nanos(self.start.elapsed());
            if now >= self.next.load(Ordering::Relaxed) {
                let stop = (self.poll)();
                let end = nanos(self.start.elapsed());
                let wait = (end - now).saturating_mul(20);
                let interval = wait.clamp(nanos(POLL_INTERVAL), nanos(MAX_POLL_INTERVAL));
                self.next.store(end.saturating_add(interval), Ordering::Relaxed);
                POLL_EVERY.store(interval, Ordering::Relaxed);
                if stop {
                    self.requested.store(true, Ordering::Relaxed);
                    return true;
                }
            }
        }
        false
    }

    /// Whether the call was told to stop.
    pub fn was_requested(&self) -> bool {
        self.requested.load(Ordering::Relaxed)
    }
}

struct State {
    threads: usize,
    pid: u32,
    pool: Option<Arc<ThreadPool>>,
}

static STATE: Mutex<State> = Mutex::new(State { threads: 0, pid: 0, pool: None });

fn lock() -> MutexGuard<'static, State> {
    // A panic while holding this lock cannot leave `State` inconsistent, so poisoning is ignored.
    STATE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_THREADS))
}

/// The most threads the pool may have: more than any CPU this runs on has, few enough that
/// building the pool takes milliseconds.
pub const MAX_THREADS: usize = 1024;

/// Sets the number of threads the kernels may use (clamped to `1..=MAX_THREADS`).
pub fn set_num_threads(n: usize) {
    let mut state = lock();
    let n = n.clamp(1, MAX_THREADS);
    if state.threads != n {
        state.threads = n;
        state.pool = None;
    }
}

impl State {
    /// The configured number of threads (the number of CPUs until one is set).
    fn threads(&mut self) -> usize {
        if self.threads == 0 {
            self.threads = default_threads();
        }
        self.threads
    }
}

/// The number of threads the kernels may use.
pub fn num_threads() -> usize {
    lock().threads()
}

/// The pool to run on, or `None` when one thread is configured (or the pool cannot be built, in
/// which case the work runs on the calling thread and still gives the same bits).
pub fn current() -> Option<Arc<ThreadPool>> {
    let mut state = lock(); // one lock per call: this runs before every kernel
    let threads = state.threads();
    if threads <= 1 {
        return None;
    }
    let pid = std::process::id();
    if state.pid != pid {
        // After fork the old pool's threads are gone; dropping it would signal threads that do
        // not exist, so it is leaked instead (once per fork).
        if let Some(stale) = state.pool.take() {
            std::mem::forget(stale);
        }
        state.pid = pid;
    }
    if state.pool.is_none() {
        state.pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("attnkit-{i}"))
            .build()
            .ok()
            .map(Arc::new);
    }
    state.pool.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_request_skips_the_tasks_left() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let poll = || true; // as if a signal handler had raised at the first poll
        for on_pool in [false, true] {
            let stop = Stop::new(&poll);
            let par = Par::new(on_pool.then_some(&pool), Some(&stop));
            let done = AtomicUsize::new(0);
            let mut tasks = vec![(); 400];
            par.for_each(&mut tasks, |_| {
                std::thread::sleep(Duration::from_millis(2));
                done.fetch_add(1, Ordering::Relaxed);
            });
            // The first poll comes after 20 ms (100 ms at most, should the other test have
            // left that interval): at most about 50 tasks a thread of the 400.
            assert!(stop.was_requested());
            assert!(done.load(Ordering::Relaxed) < 200, "{} tasks ran", done.load(Ordering::Relaxed));
        }
        let never = || false;
        let stop = Stop::new(&never);
        let done = AtomicUsize::new(0);
        Par::new(Some(&pool), Some(&stop)).for_each(&mut [(); 30], |_| {
            std::thread::sleep(Duration::from_millis(2));
            done.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(done.load(Ordering::Relaxed), 30);
        assert!(!stop.was_requested());
    }

    #[test]
    fn a_call_never_waits_for_a_helper_that_has_not_started() {
        // Both pool threads busy elsewhere (as with another library's threads spinning on the
        // other cores): the calling thread does every task, and returns long before they free.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let release = Arc::new(AtomicBool::new(false));
        for _ in 0..2 {
            let release = Arc::clone(&release);
            pool.spawn(move || spin_until(&release, Duration::from_secs(10)));
        }
        std::thread::sleep(Duration::from_millis(20)); // both taken up
        let start = Instant::now();
        let mut tasks = vec![0u32; 40];
        Par::on(&pool).for_each(&mut tasks, |x| *x += 1);
        let took = start.elapsed();
        assert!(tasks.iter().all(|&x| x == 1));
        assert!(took < Duration::from_secs(5), "waited {took:?} for the helpers");
        // The late helpers find the call closed; the pool still serves the next call.
        release.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
        let done = AtomicUsize::new(0);
        Par::on(&pool).for_each(&mut [(); 64], |_| {
            done.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(done.load(Ordering::Relaxed), 64);
    }

    /// Spins until `flag` is set or `limit` has passed.
    fn spin_until(flag: &AtomicBool, limit: Duration) {
        let start = Instant::now();
        while !flag.load(Ordering::SeqCst) && start.elapsed() < limit {
            std::hint::spin_loop();
        }
    }

    #[test]
    fn a_task_that_panics_on_any_thread_panics_the_call() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for bad in [0, 7, 63] {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut tasks: Vec<usize> = (0..64).collect();
                Par::on(&pool).for_each(&mut tasks, |&mut i| {
                    std::thread::sleep(Duration::from_micros(200));
                    assert_ne!(i, bad, "task {i}");
                });
            }));
            let panic = result.expect_err("the call must panic");
            let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
            assert!(message.contains(&format!("task {bad}")), "{message}");
        }
        // The pool still works.
        let mut tasks = vec![0u8; 16];
        Par::on(&pool).for_each(&mut tasks, |x| *x = 1);
        assert!(tasks.iter().all(|&x| x == 1));
    }

    #[test]
    fn slow_polls_come_less_often() {
        // A poll that waits 5 ms (as for the GIL while another Python thread runs) is repeated
        // every 100 ms, not every 20: over 300 ms of work, at most four polls.
        let polls = AtomicUsize::new(0);
        let poll = || {
            polls.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(5));
            false
        };
        let stop = Stop::new(&poll);
        Par::new(None, Some(&stop))
            .for_each(&mut [(); 150], |_| std::thread::sleep(Duration::from_millis(2)));
        let n = polls.load(Ordering::Relaxed);
        assert!((1..=4).contains(&n), "{n} polls");
    }
}
