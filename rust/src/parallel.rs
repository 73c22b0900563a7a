//! Thread pools sized by the caller (Python passes `torch.get_num_threads()`),
//! so Rust and torch do not fight over the same cores.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use rayon::{ThreadPool, ThreadPoolBuilder};

/// A pool with `threads` workers, built once per distinct size and kept.
pub fn pool(threads: usize) -> Arc<ThreadPool> {
    static POOLS: OnceLock<Mutex<HashMap<usize, Arc<ThreadPool>>>> = OnceLock::new();
    let threads = threads.clamp(1, 1024);
    let mut pools = POOLS
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    pools
        .entry(threads)
        .or_insert_with(|| {
            Arc::new(
                ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("qpeft-{i}"))
                    .build()
                    .expect("building a rayon thread pool"),
            )
        })
        .clone()
}

/// How many quantization blocks one task should take: enough elements
/// (about 64 Ki) that scheduling costs nothing, few enough to balance.
pub fn blocks_per_task(n_blocks: usize, blocksize: usize, threads: usize) -> usize {
    let min_blocks = (65_536 / blocksize).max(1);
    let even_split = n_blocks.div_ceil(threads.max(1) * 4);
    even_split.max(min_blocks).max(1)
}

/// Runs `task(i)` for every i in `0..n_tasks` on up to `threads` threads:
/// torch's own OpenMP team inside a torch process (between torch operations
/// its threads spin waiting for the next one, and a separate pool would
/// fight them for the cores), else the rayon pool. The calling thread works
/// too; tasks go to whichever thread claims them first.
pub fn run_tasks(threads: usize, n_tasks: usize, task: &(dyn Fn(usize) + Sync)) {
    let workers = threads.min(n_tasks);
    if workers <= 1 {
        (0..n_tasks).for_each(task);
        return;
    }
    #[cfg(target_os = "linux")]
    if let Some(omp) = openmp::runtime() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let next = AtomicUsize::new(0);
        omp.parallel(workers, &|_| loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= n_tasks {
                break;
            }
            task(i);
        });
        return;
    }
    use rayon::prelude::*;
    pool(threads).install(|| (0..n_tasks).into_par_iter().for_each(task));
}

#[cfg(target_os = "linux")]
pub mod openmp {
    //! The OpenMP runtime torch runs its operations on (libgomp, which torch
    //! loads into the global symbol namespace), found at run time with
    //! `dlsym`. Absent (plain Rust, no torch, another runtime), or with
    //! `QPEFT_NO_OPENMP=1`, kernels use their rayon pool instead.

    use std::ffi::c_void;
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::OnceLock;

    /// `GOMP_parallel(fn, data, num_threads, flags)`: runs `fn(data)` on a team
    /// of `num_threads` (the caller is thread 0) and returns when all are done.
    type ParallelFn = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, u32, u32);
    type ThreadNumFn = unsafe extern "C" fn() -> i32;

    pub struct Runtime {
        parallel: ParallelFn,
        thread_num: ThreadNumFn,
    }

    pub fn runtime() -> Option<&'static Runtime> {
        static RUNTIME: OnceLock<Option<Runtime>> = OnceLock::new();
        RUNTIME
            .get_or_init(|| {
                if std::env::var("QPEFT_NO_OPENMP").is_ok_and(|v| v == "1") {
                    return None;
                }
                // SAFETY: dlsym with RTLD_DEFAULT only looks symbols up; the
                // signatures are libgomp's stable ABI (GCC >= 4.9).
                unsafe {
                    let p = libc::dlsym(libc::RTLD_DEFAULT, c"GOMP_parallel".as_ptr());
                    let t = libc::dlsym(libc::RTLD_DEFAULT, c"omp_get_thread_num".as_ptr());
                    (!p.is_null() && !t.is_null()).then(|| Runtime {
                        parallel: std::mem::transmute::<*mut c_void, ParallelFn>(p),
                        thread_num: std::mem::transmute::<*mut c_void, ThreadNumFn>(t),
                    })
                }
            })
            .as_ref()
    }

    struct Job<'a> {
        work: &'a (dyn Fn(usize) + Sync),
        thread_num: ThreadNumFn,
        panicked: AtomicBool,
    }

    extern "C" fn run(data: *mut c_void) {
        // SAFETY: `data` is the `Job` that `parallel` passed, alive until
        // GOMP_parallel returns (after every team thread has left this function).
        let job = unsafe { &*(data as *const Job) };
        // SAFETY: called on a thread of the team, as OpenMP requires.
        let me = unsafe { (job.thread_num)() }.max(0) as usize;
        // A panic must not unwind into C; it is re-raised by the caller.
        if catch_unwind(AssertUnwindSafe(|| (job.work)(me))).is_err() {
            job.panicked.store(true, Ordering::SeqCst);
        }
    }

    impl Runtime {
        /// `work(i)` for each thread i of a team of (at most) `threads`.
        /// The team may be smaller (inside another parallel region it is
        /// just the caller), so `work` must not rely on every i running.
        pub fn parallel(&self, threads: usize, work: &(dyn Fn(usize) + Sync)) {
            let job = Job { work, thread_num: self.thread_num, panicked: AtomicBool::new(false) };
            // SAFETY: `run` matches the callback ABI and only reads `job`,
            // which outlives the call.
            unsafe { (self.parallel)(run, &job as *const Job as *mut c_void, threads as u32, 0) };
            if job.panicked.load(Ordering::SeqCst) {
                panic!("a qpeft worker thread panicked");
            }
        }
    }
}

