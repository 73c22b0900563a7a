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
