//! A page store: fixed-size pages of bytes, at most `max_resident_bytes` of
//! them in memory ("frames"), the rest in a backing store (host memory or a
//! file), brought in least-recently-used first out.
//!
//! Callers walk a sequence of pages ([`PageStore::walk`]); with prefetching,
//! a background thread reads the pages that come next in the sequence into
//! free frames (writing back the least recently used dirty page when no frame
//! is free) while the caller works on the current one. Every frame counts
//! against the budget, the prefetched ones too, and frames are allocated on
//! first use, so the store never holds more than `max_resident_bytes` of
//! pages.
//!
//! The file backing uses checked `pwrite`/`pread` rather than a memory map:
//! a failed write to a mapped file arrives as SIGBUS, not as an error, and
//! mapped pages would count in the process's resident set. Its guarantees:
//!
//! * space for every page is allocated in the file (`posix_fallocate`) when
//!   the page is added, so a full disk or a file-size limit fails there, not
//!   in the middle of a walk;
//! * a dirty page whose write fails stays resident and dirty: its data is
//!   never dropped;
//! * before every read the file is checked (still linked, long enough) and
//!   after it the page's checksum, written with it, is verified: a deleted,
//!   truncated or corrupted file is an error, never wrong data.
//!
//! The file is created in the directory the caller names, under a unique
//! name, and removed when the store is dropped.
//!
//! Host-memory backing on a CPU ([`HostBacking`]) holds its pages in the same
//! memory as the frames, so there a page in or out moves the page's buffer
//! between the backing and the frame ([`Backing::exchange`]) instead of
//! copying it: the walk, the LRU order, the pins and the counters are those
//! of a copying store, the frames still hold at most `max_resident_bytes` of
//! pages, and each page's bytes exist once (a copying host backing would
//! keep every page plus the frames). Copying a page both ways per visit
//! would more than double the memory traffic of the optimizer step it
//! serves. A move costs next to nothing, so such a walk brings its pages in
//! itself, without the prefetch thread. File backing (and, later, pages in
//! device memory) copy.

use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::error::{invalid, storage, Error, Result};

/// Index of a page in its store.
pub type PageId = usize;

/// Page sizes are whole multiples of this (file offsets stay block-aligned).
pub const PAGE_ALIGN: usize = 4096;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn as_bytes(words: &[u64]) -> &[u8] {
    // SAFETY: u8 has no alignment or validity requirement; same memory, 8x the length.
    unsafe { std::slice::from_raw_parts(words.as_ptr() as *const u8, words.len() * 8) }
}

fn as_bytes_mut(words: &mut [u64]) -> &mut [u8] {
    // SAFETY: as in `as_bytes`; the borrow is unique.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, words.len() * 8) }
}

/// 64-bit checksum of a page; `seed` (the page index) makes a page written
/// in the wrong place fail too. Each step is a bijection of the running lane
/// and of the input word, so any change of a single word changes the result.
pub fn checksum(data: &[u8], seed: u64) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut lanes = [seed ^ K, seed.rotate_left(16) ^ 0xc2b2_ae3d_27d4_eb4f, seed.rotate_left(32) ^ 0x1656_67b1_9e37_79f9, !seed];
    let mut chunks = data.chunks_exact(32);
    for c in &mut chunks {
        for (l, lane) in lanes.iter_mut().enumerate() {
            let w = u64::from_le_bytes(c[8 * l..8 * l + 8].try_into().unwrap_or([0; 8]));
            *lane = (*lane ^ w).wrapping_mul(K).rotate_left(29);
        }
    }
    for &b in chunks.remainder() {
        lanes[0] = (lanes[0] ^ b as u64).wrapping_mul(K).rotate_left(29);
    }
    let mut h = lanes[0];
    for lane in &lanes[1..] {
        h = (h ^ lane.wrapping_mul(K)).rotate_left(23).wrapping_mul(K);
    }
    h ^ data.len() as u64
}

/// Where pages live when they are not resident.
pub trait Backing: Send + Sync {
    /// Make room for `pages` pages in all (never shrinks).
    fn reserve(&mut self, pages: usize) -> Result<()>;
    /// Fail if the backing can no longer be read (a deleted or truncated file).
    fn check(&self) -> Result<()>;
    /// Store page `page`; `data` is one page.
    fn write(&self, page: PageId, data: &[u8]) -> Result<()>;
    /// Read back what [`Backing::write`] stored for `page`.
    fn read(&self, page: PageId, data: &mut [u8]) -> Result<()>;
    /// The backing file, if there is one.
    fn path(&self) -> Option<&Path> {
        None
    }
    /// Whether pages move between this backing and the frames (see
    /// [`Backing::exchange`]) instead of being copied by `write` and `read`.
    fn moves_pages(&self) -> bool {
        false
    }
    /// Swap the buffer held for `page` (empty if it holds none) with `buf`:
    /// a page-out hands the frame's buffer over and gets an empty one back, a
    /// page-in takes the page's buffer. Only called when [`Backing::moves_pages`].
    fn exchange(&self, page: PageId, buf: &mut Vec<u64>) -> Result<()> {
        let _ = (page, buf);
        Err(invalid("internal: this backing copies pages; it cannot move them"))
    }
}

/// Pages in ordinary host memory, each allocated on its first write (or, as
/// frames and backing share the memory, moved in and out of the frames).
pub struct HostBacking {
    page_words: usize,
    slots: Vec<Mutex<Vec<u64>>>,
}

impl HostBacking {
    pub fn new(page_bytes: usize) -> Self {
        HostBacking { page_words: page_bytes / 8, slots: Vec::new() }
    }
}

impl Backing for HostBacking {
    fn reserve(&mut self, pages: usize) -> Result<()> {
        while self.slots.len() < pages {
            self.slots.push(Mutex::new(Vec::new()));
        }
        Ok(())
    }

    fn check(&self) -> Result<()> {
        Ok(())
    }

    fn write(&self, page: PageId, data: &[u8]) -> Result<()> {
        let mut slot = lock(&self.slots[page]);
        if slot.is_empty() {
            slot.try_reserve_exact(self.page_words).map_err(|_| {
                storage(format!(
                    "out of host memory for a {} KiB page of paged optimizer state; \
                     use backing='file' or lower the state's size",
                    self.page_words / 128
                ))
            })?;
            slot.resize(self.page_words, 0);
        }
        as_bytes_mut(&mut slot).copy_from_slice(data);
        Ok(())
    }

    fn read(&self, page: PageId, data: &mut [u8]) -> Result<()> {
        let slot = lock(&self.slots[page]);
        if slot.is_empty() {
            data.fill(0);
        } else {
            data.copy_from_slice(as_bytes(&slot));
        }
        Ok(())
    }

    fn moves_pages(&self) -> bool {
        true
    }

    fn exchange(&self, page: PageId, buf: &mut Vec<u64>) -> Result<()> {
        std::mem::swap(&mut *lock(&self.slots[page]), buf);
        Ok(())
    }
}

/// Pages in a file of the caller's directory, removed on drop.
#[cfg(unix)]
pub struct FileBacking {
    file: std::fs::File,
    path: PathBuf,
    page_bytes: usize,
    /// Pages with space allocated in the file.
    reserved: usize,
    /// Checksum of each page's last successful write.
    sums: Vec<std::sync::atomic::AtomicU64>,
}

#[cfg(unix)]
fn io_error(path: &Path, what: &str, e: std::io::Error) -> Error {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::StorageFull | ErrorKind::QuotaExceeded => storage(format!(
            "no space left on the device holding the paged optimizer's state file {} ({what}): \
             free space there or pass another state_dir",
            path.display()
        )),
        ErrorKind::FileTooLarge => storage(format!(
            "the paged optimizer's state file {} hit the file-size limit ({what}; see `ulimit -f`): \
             raise the limit, or use backing='host'",
            path.display()
        )),
        ErrorKind::UnexpectedEof => storage(format!(
            "the paged optimizer's state file {} is shorter than the state written to it ({what}): \
             it was truncated while in use; the optimizer state is lost, restore it from a saved state_dict",
            path.display()
        )),
        _ => storage(format!("{what} the paged optimizer's state file {} failed: {e}", path.display())),
    }
}

#[cfg(unix)]
impl FileBacking {
    /// Create a new, empty state file in `dir`.
    pub fn create(dir: &Path, page_bytes: usize) -> Result<Self> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        if !dir.is_dir() {
            return Err(invalid(format!(
                "state_dir {} is not an existing directory; create it or pass another one",
                dir.display()
            )));
        }
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let mut last = None;
        for _ in 0..16 {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!("qpeft-paged-{}-{n}-{nanos:08x}.state", std::process::id()));
            match std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path) {
                Ok(file) => return Ok(FileBacking { file, path, page_bytes, reserved: 0, sums: Vec::new() }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => return Err(io_error(&path, "creating", e)),
            }
        }
        Err(storage(format!("could not create a unique state file in {}: {last:?}", dir.display())))
    }

    /// Allocate the bytes `[from, to)` of the file, so later writes there cannot run out of space.
    fn allocate(&self, from: usize, to: usize) -> Result<()> {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: a plain system call on a descriptor we own.
            let rc = unsafe { libc::posix_fallocate(self.file.as_raw_fd(), from as libc::off_t, (to - from) as libc::off_t) };
            if rc == 0 {
                return Ok(());
            }
            // Filesystems without fallocate get the space by writing zeros.
            if rc != libc::EOPNOTSUPP && rc != libc::EINVAL {
                return Err(io_error(&self.path, "allocating space in", std::io::Error::from_raw_os_error(rc)));
            }
        }
        use std::os::unix::fs::FileExt;
        let zeros = vec![0u8; (1 << 20).min(to - from)];
        let mut at = from;
        while at < to {
            let n = zeros.len().min(to - at);
            self.file
                .write_all_at(&zeros[..n], at as u64)
                .map_err(|e| io_error(&self.path, "allocating space in", e))?;
            at += n;
        }
        Ok(())
    }
}

#[cfg(unix)]
impl Backing for FileBacking {
    fn reserve(&mut self, pages: usize) -> Result<()> {
        if pages <= self.reserved {
            return Ok(());
        }
        self.allocate(self.reserved * self.page_bytes, pages * self.page_bytes)?;
        self.sums.resize_with(pages, Default::default);
        self.reserved = pages;
        Ok(())
    }

    fn check(&self) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let meta = self.file.metadata().map_err(|e| io_error(&self.path, "checking", e))?;
        if meta.nlink() == 0 {
            return Err(storage(format!(
                "the paged optimizer's state file {} was deleted while in use; the optimizer state is lost, \
                 restore it from a saved state_dict (and keep state_dir free of cleaners)",
                self.path.display()
            )));
        }
        let need = (self.reserved * self.page_bytes) as u64;
        if meta.len() < need {
            return Err(storage(format!(
                "the paged optimizer's state file {} was truncated to {} bytes while in use (it holds {need}); \
                 the optimizer state is lost, restore it from a saved state_dict",
                self.path.display(),
                meta.len()
            )));
        }
        Ok(())
    }

    fn write(&self, page: PageId, data: &[u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        use std::sync::atomic::Ordering;
        let sum = checksum(data, page as u64);
        self.file
            .write_all_at(data, (page * self.page_bytes) as u64)
            .map_err(|e| io_error(&self.path, "writing", e))?;
        self.sums[page].store(sum, Ordering::Relaxed);
        Ok(())
    }

    fn read(&self, page: PageId, data: &mut [u8]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        use std::sync::atomic::Ordering;
        self.check()?;
        self.file
            .read_exact_at(data, (page * self.page_bytes) as u64)
            .map_err(|e| io_error(&self.path, "reading", e))?;
        if checksum(data, page as u64) != self.sums[page].load(Ordering::Relaxed) {
            return Err(storage(format!(
                "page {page} of the paged optimizer's state file {} does not match its checksum: the file was \
                 modified or corrupted while in use; the optimizer state is lost, restore it from a saved state_dict",
                self.path.display()
            )));
        }
        Ok(())
    }

    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }
}

#[cfg(unix)]
impl Drop for FileBacking {
    fn drop(&mut self) {
        // Best effort: the file may already be gone.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Counters of a store (see [`PageStore::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub page_bytes: usize,
    /// Pages in the store (resident or not).
    pub pages: usize,
    pub max_resident_bytes: usize,
    /// Bytes of frames now allocated (each holds one page).
    pub resident_bytes: usize,
    /// The most `resident_bytes` ever reached.
    pub peak_resident_bytes: usize,
    /// Pages brought into a frame (read from the backing, or zero-filled the first time).
    pub page_ins: u64,
    /// Dirty pages written (or, in host memory, moved) to the backing.
    pub page_outs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    /// Holds no page (its buffer may be allocated).
    Free,
    /// Being filled or written back by the loader.
    Loading,
    /// Holds a page nobody is working on.
    Ready,
    /// The walker is working on its page.
    Busy,
}

struct FrameMeta {
    page: Option<PageId>,
    dirty: bool,
    last_use: u64,
    state: Use,
    /// Counted in `resident_bytes` (from its first page on).
    counted: bool,
}

#[derive(Default)]
struct PageMeta {
    frame: Option<usize>,
    /// The backing holds this page (otherwise it is all zeros); for a
    /// backing that moves pages, the page's buffer when not resident.
    written: bool,
    /// Upcoming visits of the current walk that the loader has prepared.
    pins: u32,
}

#[derive(Default)]
struct Table {
    pages: Vec<PageMeta>,
    frames: Vec<FrameMeta>,
    clock: u64,
    stats: Stats,
    /// Walk positions the loader has made resident.
    io_done: usize,
    io_error: Option<Error>,
    stop: bool,
    loader_exited: bool,
}

/// Applies its change to the table and wakes every waiter when dropped.
struct Notify<'a, F: FnMut(&mut Table)>(&'a PageStore, F);

impl<F: FnMut(&mut Table)> Drop for Notify<'_, F> {
    fn drop(&mut self) {
        (self.1)(&mut lock(&self.0.table));
        self.0.changed.notify_all();
    }
}

/// Fixed-size pages under a resident budget, with LRU eviction to a [`Backing`].
pub struct PageStore {
    page_bytes: usize,
    backing: Box<dyn Backing>,
    table: Mutex<Table>,
    changed: Condvar,
    /// One buffer per frame, allocated on first use.
    bufs: Vec<Mutex<Vec<u64>>>,
}

impl PageStore {
    /// A store of `page_bytes` pages (a multiple of 4096) keeping at most
    /// `max_resident_bytes` of them in memory (at least one page).
    pub fn new(page_bytes: usize, max_resident_bytes: usize, backing: Box<dyn Backing>) -> Result<Self> {
        if page_bytes == 0 || !page_bytes.is_multiple_of(PAGE_ALIGN) {
            return Err(invalid(format!("page_bytes must be a positive multiple of {PAGE_ALIGN}, got {page_bytes}")));
        }
        let frames = max_resident_bytes / page_bytes;
        if frames == 0 {
            return Err(invalid(format!(
                "max_resident_bytes ({max_resident_bytes}) is smaller than one page ({page_bytes} bytes); \
                 raise max_resident_bytes or lower page_bytes"
            )));
        }
        let table = Table {
            frames: (0..frames).map(|_| FrameMeta { page: None, dirty: false, last_use: 0, state: Use::Free, counted: false }).collect(),
            stats: Stats { page_bytes, max_resident_bytes, ..Stats::default() },
            ..Table::default()
        };
        Ok(PageStore {
            page_bytes,
            backing,
            table: Mutex::new(table),
            changed: Condvar::new(),
            bufs: (0..frames).map(|_| Mutex::new(Vec::new())).collect(),
        })
    }

    /// A store whose pages live in host memory when not resident.
    pub fn in_host_memory(page_bytes: usize, max_resident_bytes: usize) -> Result<Self> {
        Self::new(page_bytes, max_resident_bytes, Box::new(HostBacking::new(page_bytes)))
    }

    /// A store whose pages live in a new file in `dir` when not resident.
    #[cfg(unix)]
    pub fn in_file(dir: &Path, page_bytes: usize, max_resident_bytes: usize) -> Result<Self> {
        if page_bytes == 0 || !page_bytes.is_multiple_of(PAGE_ALIGN) {
            return Err(invalid(format!("page_bytes must be a positive multiple of {PAGE_ALIGN}, got {page_bytes}")));
        }
        Self::new(page_bytes, max_resident_bytes, Box::new(FileBacking::create(dir, page_bytes)?))
    }

    pub fn page_bytes(&self) -> usize {
        self.page_bytes
    }

    /// Number of pages in the store.
    pub fn pages(&self) -> usize {
        lock(&self.table).pages.len()
    }

    /// Add `n` zero pages; returns the index of the first. Their space in
    /// the backing is allocated now; on failure nothing is added.
    pub fn add_pages(&mut self, n: usize) -> Result<PageId> {
        let first = self.pages();
        self.backing.reserve(first + n)?;
        let table = self.table.get_mut().unwrap_or_else(|p| p.into_inner());
        table.pages.resize_with(first + n, PageMeta::default);
        table.stats.pages = first + n;
        Ok(first)
    }

    /// Fail if the backing can no longer be read (see [`Backing::check`]).
    pub fn check(&self) -> Result<()> {
        self.backing.check()
    }

    pub fn stats(&self) -> Stats {
        lock(&self.table).stats
    }

    pub fn backing_path(&self) -> Option<&Path> {
        self.backing.path()
    }

    /// Visit the pages `order` in turn, calling `f(position, page bytes)` on
    /// each while it is resident (a page may occur several times). With
    /// `prefetch`, a background thread brings the following pages in while
    /// `f` runs. With `writes`, visited pages become dirty. Returns how many
    /// visits completed, and the first error (of `f`, or of paging).
    pub fn walk<F>(&self, order: &[PageId], prefetch: bool, writes: bool, mut f: F) -> (usize, Result<()>)
    where
        F: FnMut(usize, &mut [u8]) -> Result<()>,
    {
        {
            let mut t = lock(&self.table);
            if let Some(&bad) = order.iter().find(|&&p| p >= t.pages.len()) {
                return (0, Err(invalid(format!("page {bad} is not in the store ({} pages)", t.pages.len()))));
            }
            t.io_done = 0;
            t.io_error = None;
            t.stop = false;
            t.loader_exited = false;
        }
        // A backing that moves pages (host memory) brings one in by swapping a
        // buffer: nothing worth a thread, whose wake-ups per page would take
        // turns with the caller's own threads on the cores.
        let threaded = prefetch && order.len() > 1 && self.bufs.len() > 1 && !self.backing.moves_pages();
        let mut done = 0;
        let result = if threaded {
            std::thread::scope(|s| {
                s.spawn(|| {
                    // However the loader ends (even by a panic), the walker stops waiting for it.
                    let _exit = Notify(self, |t: &mut Table| t.loader_exited = true);
                    for j in 0..order.len() {
                        match self.load_position(order, j, true) {
                            Ok(true) => {}
                            Ok(false) => return,
                            Err(e) => {
                                lock(&self.table).io_error = Some(e);
                                self.changed.notify_all();
                                return;
                            }
                        }
                    }
                });
                // However the walker ends (even by a panic), the loader stops.
                let _stop = Notify(self, |t: &mut Table| t.stop = true);
                self.visit_all(order, writes, &mut done, &mut f, None)
            })
        } else {
            self.visit_all(order, writes, &mut done, &mut f, Some(()))
        };
        let mut t = lock(&self.table);
        for p in t.pages.iter_mut() {
            p.pins = 0;
        }
        t.io_error = None;
        (done, result)
    }

    fn visit_all<F>(&self, order: &[PageId], writes: bool, done: &mut usize, f: &mut F, inline: Option<()>) -> Result<()>
    where
        F: FnMut(usize, &mut [u8]) -> Result<()>,
    {
        for k in 0..order.len() {
            if inline.is_some() {
                self.load_position(order, k, false)?;
            }
            let frame = {
                let mut t = lock(&self.table);
                loop {
                    // Every page the loader prepared is visited before its error
                    // is reported, so how far a failed walk got is deterministic.
                    if t.io_done > k {
                        break;
                    }
                    if let Some(e) = t.io_error.take() {
                        return Err(e);
                    }
                    if t.loader_exited && inline.is_none() {
                        return Err(invalid("internal: the page loader stopped early"));
                    }
                    t = self.changed.wait(t).unwrap_or_else(|p| p.into_inner());
                }
                let frame = t.pages[order[k]].frame.ok_or_else(|| invalid("internal: a prepared page is not resident"))?;
                t.frames[frame].state = Use::Busy;
                frame
            };
            let r = {
                let mut buf = lock(&self.bufs[frame]);
                // A panic becomes an error so the frame is handed back and the loader stops.
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(k, as_bytes_mut(&mut buf))))
                    .unwrap_or_else(|_| Err(invalid("internal: a page visit panicked")))
            };
            {
                let mut t = lock(&self.table);
                t.clock += 1;
                let clock = t.clock;
                let fr = &mut t.frames[frame];
                fr.state = Use::Ready;
                fr.dirty |= writes;
                fr.last_use = clock;
                let pins = &mut t.pages[order[k]].pins;
                *pins = pins.saturating_sub(1);
            }
            self.changed.notify_all();
            r?;
            *done = k + 1;
        }
        Ok(())
    }

    /// The frame to (re)use: a free one, else the least recently used page
    /// that no upcoming visit needs.
    fn pick_frame(t: &Table) -> Option<usize> {
        if let Some(f) = t.frames.iter().position(|fr| fr.state == Use::Free) {
            return Some(f);
        }
        t.frames
            .iter()
            .enumerate()
            .filter(|(_, fr)| fr.state == Use::Ready && fr.page.is_none_or(|p| t.pages[p].pins == 0))
            .min_by_key(|(_, fr)| fr.last_use)
            .map(|(i, _)| i)
    }

    /// Make the page of walk position `j` resident and pin it. Returns
    /// Ok(false) if the walk was stopped. Waits for a frame if `wait`.
    fn load_position(&self, order: &[PageId], j: usize, wait: bool) -> Result<bool> {
        let page = order[j];
        let mut t = lock(&self.table);
        let frame = loop {
            if t.stop {
                return Ok(false);
            }
            if t.pages[page].frame.is_some() {
                t.pages[page].pins += 1;
                t.io_done = j + 1;
                drop(t);
                self.changed.notify_all();
                return Ok(true);
            }
            match Self::pick_frame(&t) {
                Some(f) => break f,
                None if wait => t = self.changed.wait(t).unwrap_or_else(|p| p.into_inner()),
                None => return Err(invalid("internal: no frame to load a page into")),
            }
        };
        let victim = t.frames[frame].page;
        let dirty = t.frames[frame].dirty;
        let written = t.pages[page].written;
        t.frames[frame].state = Use::Loading;
        if !std::mem::replace(&mut t.frames[frame].counted, true) {
            t.stats.resident_bytes += self.page_bytes;
            t.stats.peak_resident_bytes = t.stats.peak_resident_bytes.max(t.stats.resident_bytes);
        }
        drop(t);

        let moves = self.backing.moves_pages();
        let page_words = self.page_bytes / 8;
        let mut buf = lock(&self.bufs[frame]);
        if let Some(v) = victim {
            // A moving backing gets every page back (it holds no other copy), clean or not.
            let out = if moves {
                self.backing.exchange(v, &mut buf)
            } else if dirty {
                self.backing.write(v, as_bytes(&buf))
            } else {
                Ok(())
            };
            if let Err(e) = out {
                // The victim keeps its frame and stays dirty: nothing is lost.
                lock(&self.table).frames[frame].state = Use::Ready;
                return Err(e);
            }
            let mut t = lock(&self.table);
            if dirty {
                t.stats.page_outs += 1;
            }
            if dirty || moves {
                t.pages[v].written = true;
            }
            t.pages[v].frame = None;
            let fr = &mut t.frames[frame];
            fr.page = None;
            fr.dirty = false;
        }
        let read = if written && moves {
            // The backing's buffer for `page` comes in; the frame's (empty) one goes there.
            buf.clear();
            self.backing.exchange(page, &mut buf).and_then(|()| {
                if buf.len() == page_words {
                    Ok(())
                } else {
                    Err(invalid("internal: a moved page has the wrong size"))
                }
            })
        } else {
            if buf.len() != page_words {
                // Zeroed allocation: untouched memory is not resident until used.
                *buf = vec![0u64; page_words];
            } else if !written {
                buf.fill(0);
            }
            if written { self.backing.read(page, as_bytes_mut(&mut buf)) } else { Ok(()) }
        };
        drop(buf);
        let mut t = lock(&self.table);
        if let Err(e) = read {
            t.frames[frame].state = Use::Free;
            return Err(e);
        }
        t.clock += 1;
        let clock = t.clock;
        t.stats.page_ins += 1;
        t.pages[page].frame = Some(frame);
        t.pages[page].pins += 1;
        t.frames[frame] = FrameMeta { page: Some(page), dirty: false, last_use: clock, state: Use::Ready, counted: true };
        t.io_done = j + 1;
        drop(t);
        self.changed.notify_all();
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    const PB: usize = 4096;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("qpeft-pages-test-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn fill(store: &PageStore, order: &[PageId], prefetch: bool, salt: u8) {
        let (done, r) = store.walk(order, prefetch, true, |k, b| {
            for (i, x) in b.iter_mut().enumerate() {
                *x = (order[k] as u8).wrapping_mul(31).wrapping_add(i as u8).wrapping_add(salt);
            }
            Ok(())
        });
        r.unwrap();
        assert_eq!(done, order.len());
    }

    fn verify(store: &PageStore, order: &[PageId], prefetch: bool, salt: u8) {
        let (_, r) = store.walk(order, prefetch, false, |k, b| {
            for (i, &x) in b.iter().enumerate() {
                assert_eq!(x, (order[k] as u8).wrapping_mul(31).wrapping_add(i as u8).wrapping_add(salt));
            }
            Ok(())
        });
        r.unwrap();
    }

    #[test]
    fn round_trip_under_a_small_budget_host_and_file() {
        let dir = tmpdir("roundtrip");
        for file in [false, true] {
            for prefetch in [false, true] {
                for frames in [1, 2, 3] {
                    let mut s = if file {
                        PageStore::in_file(&dir, PB, frames * PB + 100).unwrap()
                    } else {
                        PageStore::in_host_memory(PB, frames * PB + 100).unwrap()
                    };
                    s.add_pages(5).unwrap();
                    s.add_pages(4).unwrap();
                    let order: Vec<PageId> = (0..9).collect();
                    // Fresh pages read as zeros.
                    let (_, r) = s.walk(&order, prefetch, false, |_, b| {
                        assert!(b.iter().all(|&x| x == 0));
                        Ok(())
                    });
                    r.unwrap();
                    for salt in 0..3 {
                        fill(&s, &order, prefetch, salt);
                        verify(&s, &order, prefetch, salt);
                        verify(&s, &[8, 0, 3, 3, 7], prefetch, salt);
                    }
                    let st = s.stats();
                    assert!(st.peak_resident_bytes <= frames * PB, "{st:?}");
                    assert_eq!(st.resident_bytes, frames * PB);
                    assert!(st.page_outs >= 9 * 2, "{st:?}");
                }
            }
        }
    }

    #[test]
    fn host_memory_moves_pages_instead_of_copying_them() {
        // A moved page keeps its buffer: each page is seen at its own address
        // on every walk, although only two frames take turns holding them.
        let mut s = PageStore::in_host_memory(PB, 2 * PB).unwrap();
        s.add_pages(4).unwrap();
        let order: Vec<PageId> = (0..4).collect();
        let mut seen = vec![Vec::new(); 4];
        for salt in 0..3 {
            let (_, r) = s.walk(&order, true, true, |k, b| {
                seen[order[k]].push(b.as_ptr() as usize);
                b.fill(order[k] as u8 + salt);
                Ok(())
            });
            r.unwrap();
            verify_const(&s, &[3, 1, 0, 2], salt);
        }
        for addrs in &seen {
            assert!(addrs.iter().all(|&a| a == addrs[0]), "{seen:?}");
        }
        let mut first: Vec<usize> = seen.iter().map(|a| a[0]).collect();
        first.sort();
        first.dedup();
        assert_eq!(first.len(), 4);
        let st = s.stats();
        assert_eq!((st.resident_bytes, st.peak_resident_bytes), (2 * PB, 2 * PB));
        assert!(st.page_outs >= 8 && st.page_ins >= 12, "{st:?}");
    }

    fn verify_const(store: &PageStore, order: &[PageId], salt: u8) {
        let (_, r) = store.walk(order, true, false, |k, b| {
            assert!(b.iter().all(|&x| x == order[k] as u8 + salt));
            Ok(())
        });
        r.unwrap();
    }

    #[test]
    fn eviction_is_least_recently_used() {
        let mut s = PageStore::in_host_memory(PB, 2 * PB).unwrap();
        s.add_pages(3).unwrap();
        fill(&s, &[0, 1, 0, 2, 0], false, 0);
        // LRU evicts 1 for 2, so 0 stays: three page-ins. FIFO would take four.
        assert_eq!(s.stats().page_ins, 3);
        assert_eq!(s.stats().page_outs, 1);
    }

    #[test]
    fn file_is_removed_on_drop_and_deletion_fails_loudly() {
        let dir = tmpdir("delete");
        let mut s = PageStore::in_file(&dir, PB, PB).unwrap();
        s.add_pages(3).unwrap();
        let path = s.backing_path().unwrap().to_path_buf();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 * PB as u64);
        fill(&s, &[0, 1, 2], true, 1);
        std::fs::remove_file(&path).unwrap();
        let e = s.check().unwrap_err().to_string();
        assert!(e.contains("was deleted"), "{e}");
        let (_, r) = s.walk(&[0], true, false, |_, _| Ok(()));
        assert!(r.unwrap_err().to_string().contains("was deleted"));
        drop(s);

        let mut s = PageStore::in_file(&dir, PB, PB).unwrap();
        s.add_pages(1).unwrap();
        let path = s.backing_path().unwrap().to_path_buf();
        drop(s);
        assert!(!path.exists());
    }

    #[test]
    fn truncated_or_corrupted_file_fails_loudly() {
        use std::os::unix::fs::FileExt;
        let dir = tmpdir("corrupt");
        let mut s = PageStore::in_file(&dir, PB, PB).unwrap();
        s.add_pages(3).unwrap();
        fill(&s, &[0, 1, 2], false, 2);
        let path = s.backing_path().unwrap().to_path_buf();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xAB], (PB + 17) as u64).unwrap();
        let (done, r) = s.walk(&[0, 1], true, false, |_, _| Ok(()));
        assert_eq!(done, 1);
        let e = r.unwrap_err().to_string();
        assert!(e.contains("page 1") && e.contains("checksum"), "{e}");
        f.set_len(PB as u64).unwrap();
        let e = s.check().unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
    }

    /// Host memory whose writes fail while `fail` is set.
    struct Flaky {
        inner: HostBacking,
        fail: Arc<AtomicBool>,
    }

    impl Backing for Flaky {
        fn reserve(&mut self, pages: usize) -> Result<()> {
            if self.fail.load(Ordering::Relaxed) {
                return Err(storage("disk full"));
            }
            self.inner.reserve(pages)
        }
        fn check(&self) -> Result<()> {
            Ok(())
        }
        fn write(&self, page: PageId, data: &[u8]) -> Result<()> {
            if self.fail.load(Ordering::Relaxed) {
                return Err(storage("write failed"));
            }
            self.inner.write(page, data)
        }
        fn read(&self, page: PageId, data: &mut [u8]) -> Result<()> {
            self.inner.read(page, data)
        }
    }

    #[test]
    fn a_failed_write_back_keeps_the_dirty_page_and_a_failed_reserve_adds_nothing() {
        let fail = Arc::new(AtomicBool::new(false));
        let backing = Flaky { inner: HostBacking::new(PB), fail: fail.clone() };
        let mut s = PageStore::new(PB, 2 * PB, Box::new(backing)).unwrap();
        s.add_pages(4).unwrap();
        fill(&s, &[0, 1, 2, 3], true, 5);
        fail.store(true, Ordering::Relaxed);
        assert!(s.add_pages(1).is_err());
        assert_eq!(s.pages(), 4);
        // Pages 2 and 3 are resident and dirty; bringing 0 in must write one back.
        let (done, r) = s.walk(&[0], true, true, |_, _| Ok(()));
        assert_eq!(done, 0);
        assert!(r.unwrap_err().to_string().contains("write failed"));
        fail.store(false, Ordering::Relaxed);
        verify(&s, &[0, 1, 2, 3], true, 5);
    }

    #[test]
    fn a_panic_in_the_walker_is_an_error_and_the_store_stays_usable() {
        let mut s = PageStore::in_host_memory(PB, 2 * PB).unwrap();
        s.add_pages(6).unwrap();
        let (done, r) = s.walk(&[0, 1, 2, 3, 4, 5], true, true, |k, _| if k == 1 { panic!("boom") } else { Ok(()) });
        assert_eq!(done, 1);
        assert!(r.unwrap_err().to_string().contains("panicked"));
        fill(&s, &[0, 1, 2, 3, 4, 5], true, 9);
        verify(&s, &[5, 4, 3, 2, 1, 0], true, 9);
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert!(PageStore::in_host_memory(1000, 1 << 20).is_err());
        assert!(PageStore::in_host_memory(PB, PB - 1).is_err());
        let s = PageStore::in_host_memory(PB, PB).unwrap();
        assert!(s.walk(&[0], false, false, |_, _| Ok(())).1.is_err());
        assert!(PageStore::in_file(Path::new("/nonexistent/qpeft"), PB, PB).is_err());
    }

    #[test]
    fn checksum_sees_every_single_byte_change() {
        let data: Vec<u8> = (0..4099u32).map(|i| (i * 7) as u8).collect();
        let base = checksum(&data, 3);
        assert_ne!(base, checksum(&data, 4));
        for i in (0..data.len()).step_by(13) {
            let mut d = data.clone();
            d[i] ^= 1 << (i % 8);
            assert_ne!(checksum(&d, 3), base, "{i}");
        }
    }
}
