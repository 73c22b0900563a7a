//! AdamW and 8-bit AdamW with their state in a [`PageStore`].
//!
//! Each parameter's state is cut into chunks that each fit in one page:
//! float32 state ([`Kind::F32`]) as `[m; len][v; len]`, 8-bit state
//! ([`Kind::Q8`]) as `[qm; len][qv; len][absmax_m; len/256][absmax_v; len/256]`
//! with chunks of whole 256-element blocks. Chunks are packed one after
//! another in the order parameters are added, so small parameters share
//! pages. The page table of a parameter is its list of chunks.
//!
//! A step visits the parameters in the caller's order and, for each chunk,
//! runs the unpaged kernel ([`adamw_step_isa`], [`adamw8_step_isa`]) on the
//! parameter's slice and the chunk's state in its resident page. Both
//! kernels are elementwise or per block, so the results are bit-identical
//! to the unpaged optimizers. A background thread brings the next pages in
//! (see [`PageStore::walk`]).
//!
//! What a failure leaves behind:
//! * a full disk or file-size limit fails when a parameter is added (its
//!   space is allocated then), before any step changes a weight;
//! * a deleted or truncated backing file fails at the start of the step,
//!   before any weight changes;
//! * an error after the step has updated some chunks (a corrupted page, an
//!   I/O error writing a page back) leaves those chunks updated and the rest
//!   not. No chunk is ever left with new weights and lost state (a page
//!   whose write fails stays resident), but the step is half done, so the
//!   optimizer refuses all further use: restore it from a saved state.

use crate::adamw::{adamw_step_isa, AdamW32};
use crate::adamw8::{adamw8_step_isa, AdamW8, BLOCK};
use crate::cpu::Isa;
use crate::elem::{Bf16, Elem};
use crate::error::{invalid, storage, Error, Result};
use crate::pages::{PageId, PageStore, Stats};

/// How a parameter's state is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Float32 m and v (AdamW, and AdamW8bit's small parameters).
    F32,
    /// 8-bit blockwise m and v with float32 absmax per 256 elements.
    Q8,
}

/// Chunks start on cache lines.
const CHUNK_ALIGN: usize = 64;

impl Kind {
    fn q8_absmax_offset(len: usize) -> usize {
        (2 * len).next_multiple_of(4)
    }

    /// Bytes of a chunk of `len` elements.
    fn bytes(self, len: usize) -> usize {
        match self {
            Kind::F32 => 8 * len,
            Kind::Q8 => Self::q8_absmax_offset(len) + 8 * len.div_ceil(BLOCK),
        }
    }

    /// Elements of the next chunk when `space` bytes are free and `remaining` elements are left.
    fn fit(self, space: usize, remaining: usize) -> usize {
        if self.bytes(remaining) <= space {
            return remaining;
        }
        match self {
            Kind::F32 => space / 8,
            Kind::Q8 => space / (2 * BLOCK + 8) * BLOCK,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Chunk {
    page: PageId,
    /// Byte offset in the page.
    offset: usize,
    /// First element of the parameter.
    start: usize,
    len: usize,
}

struct Param {
    kind: Kind,
    numel: usize,
    chunks: Vec<Chunk>,
}

/// A parameter and its gradient, float32 or bfloat16.
pub enum ParamData<'a> {
    F32 { p: &'a mut [f32], g: &'a [f32] },
    Bf16 { p: &'a mut [Bf16], g: &'a [Bf16] },
}

impl ParamData<'_> {
    fn lens(&self) -> (usize, usize) {
        match self {
            ParamData::F32 { p, g } => (p.len(), g.len()),
            ParamData::Bf16 { p, g } => (p.len(), g.len()),
        }
    }
}

/// The scalars of one step: [`AdamW32`] for float32 state, [`AdamW8`] for 8-bit.
#[derive(Debug, Clone, Copy)]
pub enum Hyper {
    F32(AdamW32),
    Q8(AdamW8),
}

/// One parameter to update.
pub struct Item<'a> {
    pub param: usize,
    pub data: ParamData<'a>,
    pub hyper: Hyper,
}

/// A parameter's whole state, in the unpaged optimizers' layout.
pub enum StateMut<'a> {
    F32 { m: &'a mut [f32], v: &'a mut [f32] },
    Q8 { qm: &'a mut [u8], qv: &'a mut [u8], am: &'a mut [f32], av: &'a mut [f32] },
}

fn f32s(b: &mut [u8]) -> Result<&mut [f32]> {
    // SAFETY: every bit pattern is a valid f32; align_to_mut only reinterprets.
    let (pre, mid, post) = unsafe { b.align_to_mut::<f32>() };
    if !pre.is_empty() || !post.is_empty() {
        return Err(invalid("internal: misaligned page section"));
    }
    Ok(mid)
}

/// The state of one chunk, cut from its page.
fn sections(kind: Kind, len: usize, bytes: &mut [u8]) -> Result<StateMut<'_>> {
    Ok(match kind {
        Kind::F32 => {
            let (m, v) = bytes[..8 * len].split_at_mut(4 * len);
            StateMut::F32 { m: f32s(m)?, v: f32s(v)? }
        }
        Kind::Q8 => {
            let nb = len.div_ceil(BLOCK);
            let (codes, scales) = bytes[..kind.bytes(len)].split_at_mut(Kind::q8_absmax_offset(len));
            let (qm, qv) = codes[..2 * len].split_at_mut(len);
            let (am, av) = scales.split_at_mut(4 * nb);
            StateMut::Q8 { qm, qv, am: f32s(am)?, av: f32s(av)? }
        }
    })
}

fn run_kernel<T: Elem>(p: &mut [T], g: &[T], state: StateMut<'_>, hyper: &Hyper, isa: Isa, threads: usize) -> Result<()> {
    match (state, hyper) {
        (StateMut::F32 { m, v }, Hyper::F32(h)) => adamw_step_isa(isa, p, g, m, v, h, threads),
        (StateMut::Q8 { qm, qv, am, av }, Hyper::Q8(h)) => adamw8_step_isa(isa, p, g, qm, qv, am, av, h, threads),
        _ => Err(invalid("the step scalars do not match the parameter's kind of state")),
    }
}

/// The paged state of an optimizer's parameters.
pub struct PagedAdamW {
    store: PageStore,
    params: Vec<Param>,
    /// The page being filled and its first free byte.
    cursor: Option<(PageId, usize)>,
    poisoned: Option<String>,
}

impl PagedAdamW {
    pub fn new(store: PageStore) -> Self {
        PagedAdamW { store, params: Vec::new(), cursor: None, poisoned: None }
    }

    pub fn stats(&self) -> Stats {
        self.store.stats()
    }

    pub fn store(&self) -> &PageStore {
        &self.store
    }

    fn usable(&self) -> Result<()> {
        match &self.poisoned {
            None => Ok(()),
            Some(why) => Err(storage(format!(
                "this paged optimizer can no longer be used: an earlier error left its step half done ({why}); \
                 create a new optimizer and load a saved state_dict"
            ))),
        }
    }

    fn param(&self, id: usize) -> Result<&Param> {
        self.params
            .get(id)
            .ok_or_else(|| invalid(format!("no parameter {id} in this paged state ({} parameters)", self.params.len())))
    }

    /// Add a parameter of `numel` elements with zero state; returns its id.
    /// Its space in the backing is allocated now (a full disk fails here).
    pub fn add_param(&mut self, numel: usize, kind: Kind) -> Result<usize> {
        self.usable()?;
        let page_bytes = self.store.page_bytes();
        let first_new = self.store.pages();
        let (mut page, mut off) = self.cursor.unwrap_or((first_new, page_bytes));
        let mut new_pages = 0;
        let mut chunks = Vec::new();
        let mut start = 0;
        while start < numel {
            if off >= page_bytes {
                page = first_new + new_pages;
                new_pages += 1;
                off = 0;
            }
            let len = kind.fit(page_bytes - off, numel - start);
            if len == 0 {
                off = page_bytes;
                continue;
            }
            chunks.push(Chunk { page, offset: off, start, len });
            off = (off + kind.bytes(len)).next_multiple_of(CHUNK_ALIGN);
            start += len;
        }
        if new_pages > 0 {
            self.store.add_pages(new_pages)?;
        }
        if !chunks.is_empty() {
            self.cursor = Some((page, off));
        }
        if kind == Kind::Q8 {
            // Zero bytes are zero state except m's codes: 0.0 is code 127 on the signed map.
            let pages: Vec<PageId> = chunks.iter().map(|c| c.page).collect();
            let (_, r) = self.store.walk(&pages, true, true, |k, bytes| {
                let c = chunks[k];
                if let StateMut::Q8 { qm, .. } = sections(kind, c.len, &mut bytes[c.offset..])? {
                    qm.fill(127);
                }
                Ok(())
            });
            // Space not yet used: a failure here leaves no half-made parameter behind.
            r?;
        }
        self.params.push(Param { kind, numel, chunks });
        Ok(self.params.len() - 1)
    }

    pub fn kind(&self, id: usize) -> Result<Kind> {
        Ok(self.param(id)?.kind)
    }

    /// One optimizer step over `items`, in their order.
    pub fn step(&mut self, items: &mut [Item<'_>], isa: Isa, threads: usize) -> Result<()> {
        self.usable()?;
        let mut seen = vec![false; self.params.len()];
        for it in items.iter() {
            let prm = self.param(it.param)?;
            if std::mem::replace(&mut seen[it.param], true) {
                return Err(invalid(format!("parameter {} appears twice in one step", it.param)));
            }
            let (np, ng) = it.data.lens();
            if np != prm.numel || ng != prm.numel {
                return Err(invalid(format!(
                    "parameter {} has {} state elements but the parameter and gradient have {np} and {ng}",
                    it.param, prm.numel
                )));
            }
            let ok = matches!((prm.kind, &it.hyper), (Kind::F32, Hyper::F32(_)) | (Kind::Q8, Hyper::Q8(_)));
            if !ok {
                return Err(invalid(format!("parameter {} has {:?} state but got the other step's scalars", it.param, prm.kind)));
            }
        }
        // A deleted or truncated file fails here, before any weight changes.
        self.store.check()?;
        // One visit per run of consecutive chunks on the same page.
        let mut pages: Vec<PageId> = Vec::new();
        let mut visits: Vec<Vec<(usize, Chunk)>> = Vec::new();
        for (i, it) in items.iter().enumerate() {
            for &c in &self.params[it.param].chunks {
                if pages.last() != Some(&c.page) {
                    pages.push(c.page);
                    visits.push(Vec::new());
                }
                if let Some(v) = visits.last_mut() {
                    v.push((i, c));
                }
            }
        }
        let params = &self.params;
        let mut started = false;
        let (done, result) = self.store.walk(&pages, true, true, |k, bytes| {
            for &(i, c) in &visits[k] {
                let it = &mut items[i];
                let state = sections(params[it.param].kind, c.len, &mut bytes[c.offset..])?;
                let r = c.start..c.start + c.len;
                started = true;
                match &mut it.data {
                    ParamData::F32 { p, g } => run_kernel(&mut p[r.clone()], &g[r], state, &it.hyper, isa, threads)?,
                    ParamData::Bf16 { p, g } => run_kernel(&mut p[r.clone()], &g[r], state, &it.hyper, isa, threads)?,
                }
            }
            Ok(())
        });
        match result {
            Ok(()) => Ok(()),
            Err(e) if started => {
                let msg = format!("{e} (after {done} of {} pages of the step were updated)", pages.len());
                self.poisoned = Some(msg.clone());
                Err(Error::Storage(format!(
                    "{msg}; the weights of the pages before were updated and the rest were not, so this \
                     optimizer refuses further steps: create a new one and load a saved state_dict"
                )))
            }
            Err(e) => Err(e),
        }
    }

    fn check_state_lens(prm: &Param, id: usize, lens: [usize; 4]) -> Result<()> {
        let want = match prm.kind {
            Kind::F32 => [prm.numel, prm.numel, 0, 0],
            Kind::Q8 => [prm.numel, prm.numel, prm.numel.div_ceil(BLOCK), prm.numel.div_ceil(BLOCK)],
        };
        if lens != want {
            return Err(invalid(format!(
                "parameter {id} has {:?} state of {} elements; expected state arrays of lengths {want:?}, got {lens:?}",
                prm.kind, prm.numel
            )));
        }
        Ok(())
    }

    fn state_lens(s: &StateMut<'_>) -> [usize; 4] {
        match s {
            StateMut::F32 { m, v } => [m.len(), v.len(), 0, 0],
            StateMut::Q8 { qm, qv, am, av } => [qm.len(), qv.len(), am.len(), av.len()],
        }
    }

    /// Copy parameter `id`'s state out (`to_pages` false) or in (`to_pages` true).
    fn transfer(&mut self, id: usize, mut state: StateMut<'_>, to_pages: bool) -> Result<()> {
        self.usable()?;
        let prm = self.param(id)?;
        Self::check_state_lens(prm, id, Self::state_lens(&state))?;
        let kind = prm.kind;
        let chunks = prm.chunks.clone();
        let pages: Vec<PageId> = chunks.iter().map(|c| c.page).collect();
        let mut started = false;
        let (_, r) = self.store.walk(&pages, true, to_pages, |k, bytes| {
            let c = chunks[k];
            let (r, b) = (c.start..c.start + c.len, c.start / BLOCK..(c.start / BLOCK + c.len.div_ceil(BLOCK)));
            started = true;
            match (sections(kind, c.len, &mut bytes[c.offset..])?, &mut state) {
                (StateMut::F32 { m, v }, StateMut::F32 { m: sm, v: sv }) => {
                    if to_pages {
                        m.copy_from_slice(&sm[r.clone()]);
                        v.copy_from_slice(&sv[r]);
                    } else {
                        sm[r.clone()].copy_from_slice(m);
                        sv[r].copy_from_slice(v);
                    }
                }
                (StateMut::Q8 { qm, qv, am, av }, StateMut::Q8 { qm: sqm, qv: sqv, am: sam, av: sav }) => {
                    if to_pages {
                        qm.copy_from_slice(&sqm[r.clone()]);
                        qv.copy_from_slice(&sqv[r]);
                        am.copy_from_slice(&sam[b.clone()]);
                        av.copy_from_slice(&sav[b]);
                    } else {
                        sqm[r.clone()].copy_from_slice(qm);
                        sqv[r].copy_from_slice(qv);
                        sam[b.clone()].copy_from_slice(am);
                        sav[b].copy_from_slice(av);
                    }
                }
                _ => return Err(invalid(format!("parameter {id} holds {kind:?} state; got the other kind"))),
            }
            Ok(())
        });
        if let Err(e) = r {
            if to_pages && started {
                self.poisoned = Some(format!("loading the state of parameter {id} failed halfway: {e}"));
            }
            return Err(e);
        }
        Ok(())
    }

    /// Copy parameter `id`'s whole state into `out`.
    pub fn read_state(&mut self, id: usize, out: StateMut<'_>) -> Result<()> {
        self.store.check()?;
        self.transfer(id, out, false)
    }

    /// Replace parameter `id`'s state with `state` (copied).
    pub fn write_state(&mut self, id: usize, state: StateMut<'_>) -> Result<()> {
        self.store.check()?;
        self.transfer(id, state, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adamw::adamw_step;
    use crate::adamw8::adamw8_step;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
            })
            .collect()
    }

    fn h32(step: i32) -> AdamW32 {
        let (lr, b1, b2, wd) = (1e-2f64, 0.9f64, 0.999f64, 0.01f64);
        AdamW32 {
            decay: (1.0 - lr * wd) as f32,
            lerp_weight: (1.0 - b1) as f32,
            beta2: b2 as f32,
            one_minus_beta2: (1.0 - b2) as f32,
            bc2_sqrt: (1.0 - b2.powi(step)).sqrt() as f32,
            eps: 1e-8,
            step_size: (-(lr / (1.0 - b1.powi(step)))) as f32,
            maximize: false,
        }
    }

    fn h8(step: i32) -> AdamW8 {
        let (lr, b1, b2, wd) = (1e-2f64, 0.9f64, 0.999f64, 0.01f64);
        AdamW8 {
            beta1: b1 as f32,
            one_minus_beta1: (1.0 - b1) as f32,
            beta2: b2 as f32,
            one_minus_beta2: (1.0 - b2) as f32,
            bc2_sqrt: (1.0 - b2.powi(step)).sqrt() as f32,
            eps: 1e-8,
            decay: (1.0 - lr * wd) as f32,
            step_size: (-lr / (1.0 - b1.powi(step))) as f32,
            maximize: false,
        }
    }

    struct Ref {
        p: Vec<f32>,
        m: Vec<f32>,
        v: Vec<f32>,
        qm: Vec<u8>,
        qv: Vec<u8>,
        am: Vec<f32>,
        av: Vec<f32>,
        kind: Kind,
    }

    fn compare(file: bool) {
        let sizes = [(1usize, Kind::F32), (4999, Kind::Q8), (700, Kind::F32), (3 * 256 + 5, Kind::Q8), (12345, Kind::F32), (257, Kind::Q8)];
        let total: usize = sizes.iter().map(|&(n, k)| k.bytes(n)).sum();
        let pb = 4096;
        let budget = (total / 4).max(pb);
        let store = if file {
            PageStore::in_file(&std::env::temp_dir(), pb, budget).unwrap()
        } else {
            PageStore::in_host_memory(pb, budget).unwrap()
        };
        let mut paged = PagedAdamW::new(store);
        let mut refs: Vec<Ref> = Vec::new();
        let mut pp: Vec<Vec<f32>> = Vec::new();
        for (i, &(n, kind)) in sizes.iter().enumerate() {
            assert_eq!(paged.add_param(n, kind).unwrap(), i);
            let p = data(n, i as u64);
            let nb = n.div_ceil(BLOCK);
            refs.push(Ref { p: p.clone(), m: vec![0.0; n], v: vec![0.0; n], qm: vec![127; n], qv: vec![0; n], am: vec![0.0; nb], av: vec![0.0; nb], kind });
            pp.push(p);
        }
        for step in 1..=4 {
            let grads: Vec<Vec<f32>> = sizes.iter().enumerate().map(|(i, &(n, _))| data(n, 100 * step as u64 + i as u64)).collect();
            for (r, g) in refs.iter_mut().zip(&grads) {
                match r.kind {
                    Kind::F32 => adamw_step(&mut r.p, g, &mut r.m, &mut r.v, &h32(step), 2).unwrap(),
                    Kind::Q8 => adamw8_step(&mut r.p, g, &mut r.qm, &mut r.qv, &mut r.am, &mut r.av, &h8(step), 2).unwrap(),
                }
            }
            let mut items: Vec<Item> = pp
                .iter_mut()
                .zip(&grads)
                .enumerate()
                .map(|(i, (p, g))| Item {
                    param: i,
                    data: ParamData::F32 { p, g },
                    hyper: if sizes[i].1 == Kind::F32 { Hyper::F32(h32(step)) } else { Hyper::Q8(h8(step)) },
                })
                .collect();
            paged.step(&mut items, crate::cpu::best(), 2).unwrap();
            for (i, r) in refs.iter().enumerate() {
                assert!(pp[i].iter().zip(&r.p).all(|(a, b)| a.to_bits() == b.to_bits()), "param {i} step {step}");
            }
        }
        for (i, r) in refs.iter().enumerate() {
            let n = r.p.len();
            let nb = n.div_ceil(BLOCK);
            match r.kind {
                Kind::F32 => {
                    let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
                    paged.read_state(i, StateMut::F32 { m: &mut m, v: &mut v }).unwrap();
                    assert!(m == r.m && v == r.v);
                }
                Kind::Q8 => {
                    let (mut qm, mut qv, mut am, mut av) = (vec![0u8; n], vec![0u8; n], vec![0f32; nb], vec![0f32; nb]);
                    paged.read_state(i, StateMut::Q8 { qm: &mut qm, qv: &mut qv, am: &mut am, av: &mut av }).unwrap();
                    assert!(qm == r.qm && qv == r.qv && am == r.am && av == r.av);
                }
            }
        }
        let st = paged.stats();
        assert!(st.peak_resident_bytes <= budget);
        assert!(st.page_outs > 0);
    }

    #[test]
    fn bit_identical_to_unpaged_with_a_quarter_budget_host() {
        compare(false);
    }

    #[test]
    fn bit_identical_to_unpaged_with_a_quarter_budget_file() {
        compare(true);
    }

    #[test]
    fn state_round_trips_and_small_params_share_pages() {
        let mut paged = PagedAdamW::new(PageStore::in_host_memory(4096, 4096).unwrap());
        for _ in 0..10 {
            paged.add_param(10, Kind::F32).unwrap();
        }
        assert_eq!(paged.stats().pages, 1);
        let id = paged.add_param(3000, Kind::Q8).unwrap();
        let n: usize = 3000;
        let nb = n.div_ceil(BLOCK);
        let mut qm: Vec<u8> = (0..n).map(|i| i as u8).collect();
        let mut qv: Vec<u8> = (0..n).map(|i| (i * 3) as u8).collect();
        let mut am = data(nb, 1);
        let mut av = data(nb, 2);
        paged.write_state(id, StateMut::Q8 { qm: &mut qm, qv: &mut qv, am: &mut am, av: &mut av }).unwrap();
        let (mut qm2, mut qv2, mut am2, mut av2) = (vec![0u8; n], vec![0u8; n], vec![0f32; nb], vec![0f32; nb]);
        paged.read_state(id, StateMut::Q8 { qm: &mut qm2, qv: &mut qv2, am: &mut am2, av: &mut av2 }).unwrap();
        assert!(qm == qm2 && qv == qv2 && am == am2 && av == av2);
        let (mut m, mut v) = (vec![1f32; 10], vec![1f32; 10]);
        paged.read_state(3, StateMut::F32 { m: &mut m, v: &mut v }).unwrap();
        assert!(m.iter().chain(&v).all(|&x| x == 0.0));
        assert!(paged.read_state(3, StateMut::F32 { m: &mut m[..9], v: &mut v }).is_err());
        assert!(paged.read_state(id, StateMut::F32 { m: &mut vec![0.0; n], v: &mut vec![0.0; n] }).is_err());
    }

    #[test]
    fn deleted_file_fails_before_any_weight_changes() {
        let store = PageStore::in_file(&std::env::temp_dir(), 4096, 8192).unwrap();
        let path = store.backing_path().unwrap().to_path_buf();
        let mut paged = PagedAdamW::new(store);
        paged.add_param(5000, Kind::F32).unwrap();
        let mut p = data(5000, 1);
        let g = data(5000, 2);
        let mut items = vec![Item { param: 0, data: ParamData::F32 { p: &mut p, g: &g }, hyper: Hyper::F32(h32(1)) }];
        paged.step(&mut items, crate::cpu::best(), 1).unwrap();
        std::fs::remove_file(&path).unwrap();
        let before = p.clone();
        let mut items = vec![Item { param: 0, data: ParamData::F32 { p: &mut p, g: &g }, hyper: Hyper::F32(h32(2)) }];
        let e = paged.step(&mut items, crate::cpu::best(), 1).unwrap_err().to_string();
        assert!(e.contains("deleted"), "{e}");
        assert_eq!(p, before);
    }

    #[test]
    fn an_error_after_the_step_began_poisons_the_optimizer() {
        use std::os::unix::fs::FileExt;
        let store = PageStore::in_file(&std::env::temp_dir(), 4096, 8192).unwrap();
        let path = store.backing_path().unwrap().to_path_buf();
        let mut paged = PagedAdamW::new(store);
        paged.add_param(5000, Kind::F32).unwrap();
        let mut p = data(5000, 1);
        let g = data(5000, 2);
        for step in 1..=2 {
            let mut items = vec![Item { param: 0, data: ParamData::F32 { p: &mut p, g: &g }, hyper: Hyper::F32(h32(step)) }];
            paged.step(&mut items, crate::cpu::best(), 1).unwrap();
        }
        // Corrupt page 2 (written back: only 2 frames for 10 pages).
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[1, 2, 3], 2 * 4096 + 8).unwrap();
        let mut items = vec![Item { param: 0, data: ParamData::F32 { p: &mut p, g: &g }, hyper: Hyper::F32(h32(3)) }];
        let e = paged.step(&mut items, crate::cpu::best(), 1).unwrap_err().to_string();
        assert!(e.contains("checksum") && e.contains("refuses further steps"), "{e}");
        let mut items = vec![Item { param: 0, data: ParamData::F32 { p: &mut p, g: &g }, hyper: Hyper::F32(h32(4)) }];
        let e = paged.step(&mut items, crate::cpu::best(), 1).unwrap_err().to_string();
        assert!(e.contains("can no longer be used"), "{e}");
    }

    #[test]
    fn mismatched_items_are_errors() {
        let mut paged = PagedAdamW::new(PageStore::in_host_memory(4096, 4096).unwrap());
        paged.add_param(300, Kind::Q8).unwrap();
        let mut p = vec![0f32; 300];
        let g = vec![0f32; 300];
        let mut items = vec![Item { param: 0, data: ParamData::F32 { p: &mut p, g: &g }, hyper: Hyper::F32(h32(1)) }];
        assert!(paged.step(&mut items, crate::cpu::best(), 1).is_err());
        let mut items = vec![Item { param: 1, data: ParamData::F32 { p: &mut p, g: &g }, hyper: Hyper::Q8(h8(1)) }];
        assert!(paged.step(&mut items, crate::cpu::best(), 1).is_err());
        let mut items = vec![Item { param: 0, data: ParamData::F32 { p: &mut p[..299], g: &g }, hyper: Hyper::Q8(h8(1)) }];
        assert!(paged.step(&mut items, crate::cpu::best(), 1).is_err());
    }
}
