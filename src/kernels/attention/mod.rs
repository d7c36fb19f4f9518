//! Masked multi-head scaled dot-product attention, fused and tiled (online softmax).
//!
//! For batch `b`, query head `h` (key/value head `g = h / (Hq / Hkv)`), query row `i`, key `j`:
//!
//! ```text
//! s_ij = scale · q_i · k_j                      (then softcap · tanh(s_ij / softcap) if given)
//!        + float_mask[b, h, i, j] − slope[b, h] · |i' − j|           (each if given)
//! valid(i, j) = causal/window bounds around i' = i + offset, key_mask[b, j], bool_mask[b, h, i, j]
//!               and float_mask[b, h, i, j] != −inf
//! out_i = Σ_valid exp(s_ij − m_i) v_j / Σ_valid exp(s_ij − m_i),   m_i = max_valid s_ij
//! lse_i = m_i + ln Σ_valid exp(s_ij − m_i)
//! ```
//!
//! with `offset = 0` for top-left alignment and `S − L` for bottom-right. A row with no valid key
//! gives zeros (and `lse = −inf`). Invalid pairs are selected out, never multiplied by zero, so
//! whatever a masked query, key or value holds (NaN, inf) cannot reach any other output.
//!
//! Memory: `q`, `k`, `v` are addressed by (batch, head, row) strides with contiguous rows, which
//! covers the `(B, H, L, E)` and `(B, L, H, E)` layouts; `out` is `(B, Hq, L, Ev)`, `lse`
//! `(B, Hq, L)` and `weights` `(B, Hq, L, S)`, all row-major. Masks are read through element
//! strides, so broadcast dimensions cost nothing.
//!
//! Element types: queries are stored as `Q`, keys and values as `KV`, both computed in `T`
//! (`storage.rs`): float32 and float64 in themselves, float16 and bfloat16 in float32, widened
//! exactly as they are read (packed, or loaded by the explicit kernels) and each output rounded
//! once to `Q`. One tile loop (`tile.rs`) and one decode loop (`decode.rs`) serve every type.
//! bfloat16 prefill computes its matrix products in the dot-product pairs of `vdpbf16ps`
//! (`dot16.rs`, `avx512bf16.rs`), with a portable emulation of that instruction elsewhere.
//!
//! Parallel split: one task per (batch, key/value head), holding the rows of every query head that
//! shares it and walking its query blocks and key blocks in a fixed order (`tile.rs`); for short
//! queries (`L <= 16`, decode) one task per (batch, key/value head, chunk of 512 keys) and a merge
//! of the chunks in order (`decode.rs`). Neither split depends on the thread count, so neither do
//! the results.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512bf16;
mod decode;
pub(crate) mod dot16;
mod fast;
mod generic;
#[cfg(target_arch = "x86_64")]
mod lanes;
mod merge;
mod rows;
mod tile;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::mem::MaybeUninit;

use crate::error::{expect_len, product, KernelError};
use crate::kernels::exp::Exp;
use crate::kernels::storage::Storage;
use crate::kernels::{simd, Float};
use crate::pool::Par;

/// The float types attention computes in.
pub trait AttnFloat:
    Float + Exp + fast::Explicit + std::ops::Div<Output = Self> + std::ops::Neg<Output = Self>
{
    fn mul_add(self, a: Self, b: Self) -> Self;
    fn tanh(self) -> Self;
    fn ln(self) -> Self;
    fn is_finite(self) -> bool;
    /// Whether this is −0.0, the mark of a masked probability.
    fn is_neg_zero(self) -> bool;
    /// The data as float32, where this is float32 (for the bfloat16 kernels, which compute in it).
    fn as_f32(x: &[Self]) -> Option<&[f32]>;
    /// [`AttnFloat::as_f32`], writable.
    fn as_f32_mut(x: &mut [Self]) -> Option<&mut [f32]>;
    /// This thread's buffers for tasks of the tiled path (`tile::Scratch`).
    fn scratch() -> &'static std::thread::LocalKey<std::cell::Cell<tile::Scratch<Self>>>;
    const NEG_INFINITY: Self;
    const ZERO: Self;
    const ONE: Self;
}

macro_rules! impl_attn_float {
    ($t:ty, $as_f32:expr, $as_f32_mut:expr) => {
        impl AttnFloat for $t {
            #[inline(always)]
            fn mul_add(self, a: Self, b: Self) -> Self {
                <$t>::mul_add(self, a, b)
            }
            #[inline(always)]
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline(always)]
            fn is_finite(self) -> bool {
                <$t>::is_finite(self)
            }
            #[inline(always)]
            fn is_neg_zero(self) -> bool {
                self == 0.0 && self.is_sign_negative()
            }
            #[inline(always)]
            fn as_f32(x: &[Self]) -> Option<&[f32]> {
                $as_f32(x)
            }
            #[inline(always)]
            fn as_f32_mut(x: &mut [Self]) -> Option<&mut [f32]> {
                $as_f32_mut(x)
            }
            fn scratch() -> &'static std::thread::LocalKey<std::cell::Cell<tile::Scratch<Self>>> {
                thread_local!(static SCRATCH: std::cell::Cell<tile::Scratch<$t>> = Default::default());
                &SCRATCH
            }
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
        }
    };
}
impl_attn_float!(f32, Some, Some);
impl_attn_float!(f64, |_| None, |_| None);

/// Where query row `i` sits among the keys, for causal masks, windows and ALiBi.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alignment {
    /// Query `i` is position `i` (PyTorch's `is_causal`).
    TopLeft,
    /// Query `i` is position `i + S − L` (KV caches, chunked prefill), with `S` the batch item's
    /// key length where `key_lengths` gives one.
    BottomRight,
}

/// Keys per strip where keys are stored in strips (`AttnSpec::k_strips`).
pub const KEY_STRIP: usize = fast::NR;

/// Element strides of a tensor addressed as (batch, head, row), rows contiguous.
#[derive(Debug, Clone, Copy)]
pub struct Strides {
    pub batch: usize,
    pub head: usize,
    pub row: usize,
}

/// The shapes and options of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnSpec {
    pub batch: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub dim_qk: usize,
    pub dim_v: usize,
    pub q: Strides,
    pub k: Strides,
    pub v: Strides,
    pub scale: f64,
    pub softcap: Option<f64>,
    pub causal: bool,
    /// Keys allowed on each side of the aligned diagonal; `None` = unlimited.
    pub window: (Option<usize>, Option<usize>),
    pub alignment: Alignment,
    /// Keys stored transposed in strips of 16 keys (`NR`), as the tiled path packs them: element
    /// `d` of key `j` at `(j / 16 · E + d) · 16 + j % 16` from its (batch, head)'s start. `k.row`
    /// is then `E`, and `kv_len` and every key start are multiples of 16. `KVCache` stores its
    /// keys so: neither path transposes them, and short queries compute each score in the tiled
    /// path's order, so that decoding gives the bits of one call over the whole sequence.
    pub k_strips: bool,
}

/// A mask read through element strides over (batch, head, query, key); a stride of 0 broadcasts.
#[derive(Debug, Clone, Copy)]
pub struct StridedMask<'a, M> {
    pub data: &'a [M],
    pub strides: [usize; 4],
}

impl<M: Copy> StridedMask<'_, M> {
    #[inline(always)]
    fn at(&self, b: usize, h: usize, i: usize, j: usize) -> M {
        let s = self.strides;
        self.data[b * s[0] + h * s[1] + i * s[2] + j * s[3]]
    }
}

impl<M> StridedMask<'_, M> {
    /// Whether every index reachable for the given extents lies inside `data`.
    fn fits(&self, extents: [usize; 4]) -> bool {
        let last = extents.iter().zip(self.strides).try_fold(0usize, |acc, (&n, s)| match n {
            0 => None,
            _ => acc.checked_add((n - 1).checked_mul(s)?),
        });
        match last {
            Some(last) => last < self.data.len(),
            None => true, // an empty extent: nothing is read
        }
    }
}

/// The masks and biases of one call; every one is optional.
#[derive(Debug, Clone, Copy, Default)]
pub struct Masks<'a, T> {
    /// Nonzero = may attend.
    pub bool_mask: Option<StridedMask<'a, u8>>,
    /// Added to the scores; −inf = masked.
    pub float_mask: Option<StridedMask<'a, T>>,
    /// `(batch, S)`, nonzero = may attend.
    pub key_mask: Option<&'a [u8]>,
    /// ALiBi slopes, `(Hq,)` or `(batch, Hq)`.
    pub alibi: Option<&'a [f64]>,
    /// `(batch,)`: how many keys of each batch item are valid (those from 0 on; the rest are
    /// padding), each in `0..=S`. Bottom-right alignment counts from it.
    pub key_lengths: Option<&'a [i64]>,
    /// `(batch,)`: the row of K and V where each batch item's key 0 lies (with `key_lengths`, whose
    /// keys must end inside the S rows): a KV cache's window, wherever it starts in its buffer.
    pub key_starts: Option<&'a [i64]>,
    /// `(Hq,)`: a sink logit per query head, which joins every softmax denominator of its head
    /// and carries no value (gpt-oss).
    pub sinks: Option<&'a [f64]>,
    /// `(batch,)`: how many queries of each batch item are real (the first ones), each in
    /// `0..=L`: bottom-right alignment places the last real one at the item's last key. (The rows
    /// after them are computed as if they followed it; the caller discards them.)
    pub query_lengths: Option<&'a [i64]>,
}

impl<T> Masks<'_, T> {
    /// The ALiBi slope of batch `b`, query head `h`, if any.
    #[inline(always)]
    fn slope(&self, sp: &AttnSpec, b: usize, h: usize) -> Option<f64> {
        self.alibi.map(|a| a[if a.len() == sp.heads_q { h } else { b * sp.heads_q + h }])
    }

    /// How many rows into K and V batch `b`'s keys start (0 without `key_starts`).
    #[inline(always)]
    fn key_start(&self, b: usize) -> usize {
        self.key_starts.map_or(0, |n| n[b] as usize) // checked: >= 0, and the keys end inside S
    }

    /// The sink logit of query head `h`, if any.
    #[inline(always)]
    fn sink(&self, h: usize) -> Option<f64> {
        self.sinks.map(|s| s[h])
    }

    /// The valid keys of batch `b`: its key length, or S.
    #[inline(always)]
    fn key_length(&self, sp: &AttnSpec, b: usize) -> usize {
        self.key_lengths.map_or(sp.kv_len, |n| n[b] as usize) // in 0..=S (checked)
    }

    /// The aligned position of batch `b`'s query row 0 among its keys: 0 (top-left) or its key
    /// length minus L (bottom-right).
    #[inline(always)]
    fn offset(&self, sp: &AttnSpec, b: usize) -> isize {
        match sp.alignment {
            Alignment::TopLeft => 0,
            Alignment::BottomRight => {
                let queries = self.query_lengths.map_or(sp.q_len, |n| n[b] as usize); // in 0..=L (checked)
                self.key_length(sp, b) as isize - queries as isize
            }
        }
    }

    /// Batch `b`'s key mask (S entries), if any.
    #[inline(always)]
    fn key_mask(&self, sp: &AttnSpec, b: usize) -> Option<&[u8]> {
        self.key_mask.map(|km| &km[b * sp.kv_len..(b + 1) * sp.kv_len])
    }

    /// One past batch `b`'s last unpadded key (its key length without a key mask). The keys after it are
    /// masked for every row, so both paths leave them out of their key ranges: bit for bit a
    /// no-op, since key blocks keep their boundaries and a masked key would only add −inf to a
    /// maximum, −0.0 to a sum and fma(−0.0, v, acc) = acc (in bfloat16's pair mode, +0 to a sum
    /// and +0 · v to acc, which changes at most the sign of a zero, and outputs are never −0).
    #[inline(always)]
    fn keys_end(&self, sp: &AttnSpec, b: usize) -> usize {
        let n = self.key_length(sp, b);
        self.key_mask(sp, b).map_or(n, |km| km[..n].iter().rposition(|&x| x != 0).map_or(0, |j| j + 1))
    }
}

/// What one task of either path reads: the inputs (queries stored as `Q`, keys and values as
/// `KV`, both computed in `T`), and its batch `b` and key/value head `g`.
struct TaskInputs<'a, Q, KV, T> {
    q: &'a [Q],
    k: &'a [KV],
    v: &'a [KV],
    spec: &'a AttnSpec,
    masks: &'a Masks<'a, T>,
    b: usize,
    g: usize,
    /// Query heads per key/value head.
    group: usize,
    /// The call's [`Par`], asked only whether the call was told to stop (a long task asks
    /// between its query blocks).
    par: Par<'a>,
}

impl<Q, KV, T> Clone for TaskInputs<'_, Q, KV, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<Q, KV, T> Copy for TaskInputs<'_, Q, KV, T> {}

impl<'a, Q, KV, T> TaskInputs<'a, Q, KV, T> {
    /// The query position and head of task row `r`: row `r` is query position `r / G` of head
    /// `g·G + r % G`, with `G` the query heads per key/value head (no integer division where `G`
    /// is a power of two: the kernels ask for every row of every query block).
    #[inline(always)]
    fn position_head(&self, r: usize) -> (usize, usize) {
        match self.group {
            1 => (r, self.g),
            g if g.is_power_of_two() => (r >> g.trailing_zeros(), self.g * g + (r & (g - 1))),
            g => (r / g, self.g * g + r % g),
        }
    }

    /// Where the query of task row `r` starts in `q`.
    #[inline(always)]
    fn q_start(&self, r: usize) -> usize {
        let (sp, (i, h)) = (self.spec, self.position_head(r));
        self.b * sp.q.batch + h * sp.q.head + i * sp.q.row
    }

    /// The query of task row `r`.
    #[inline(always)]
    fn q_row(&self, r: usize) -> &'a [Q] {
        &self.q[self.q_start(r)..][..self.spec.dim_qk]
    }
}

/// Where the outputs go: `out` (in the queries' storage type `O`) always, `lse`, `weights` and
/// `scores` (in the compute type `T`) when requested.
pub struct Outputs<'a, O, T> {
    pub out: &'a mut [MaybeUninit<O>],
    pub lse: Option<&'a mut [MaybeUninit<T>]>,
    pub weights: Option<&'a mut [MaybeUninit<T>]>,
    /// The scores before the softmax, masked pairs −inf.
    pub scores: Option<&'a mut [MaybeUninit<T>]>,
}

fn last_index(
    spec_len: usize,
    s: Strides,
    batch: usize,
    heads: usize,
    rows: usize,
    row_len: usize,
) -> Option<usize> {
    if batch == 0 || heads == 0 || rows == 0 || row_len == 0 {
        return Some(0);
    }
    let last = (batch - 1)
        .checked_mul(s.batch)?
        .checked_add((heads - 1).checked_mul(s.head)?)?
        .checked_add((rows - 1).checked_mul(s.row)?)?
        .checked_add(row_len)?;
    (last <= spec_len).then_some(last)
}

impl AttnSpec {
    /// Per-item counts (`arg`): one per batch item, each in `0..=most` (`what`).
    fn check_counts(
        &self,
        arg: &'static str,
        counts: &[i64],
        most: usize,
        what: &str,
    ) -> Result<(), KernelError> {
        if counts.len() != self.batch {
            return Err(KernelError::invalid(
                arg,
                format!("has {} elements, expected one per batch item ({})", counts.len(), self.batch),
            ));
        }
        match counts.iter().find(|&&x| !(0..=most as i64).contains(&x)) {
            Some(bad) => {
                Err(KernelError::invalid(arg, format!("must lie in 0..={most} ({what}), got {bad}")))
            }
            None => Ok(()),
        }
    }

    fn check<Q, KV, T: crate::kernels::Float>(
        &self,
        q: &[Q],
        k: &[KV],
        v: &[KV],
        masks: &Masks<'_, T>,
        outputs: &Outputs<'_, Q, T>,
    ) -> Result<(), KernelError> {
        if self.heads_kv == 0 && self.heads_q > 0
            || self.heads_kv > 0 && !self.heads_q.is_multiple_of(self.heads_kv)
        {
            return Err(KernelError::invalid(
                "key",
                format!("{} query heads cannot share {} key/value heads", self.heads_q, self.heads_kv),
            ));
        }
        // Finite in the dtype computed in, not only in float64: 1e39 is infinite in float32.
        let finite = |x: f64| T::from_f64(x).to_f64().is_finite();
        let dtype = std::any::type_name::<T>().replace('f', "float");
        let dtype = match std::any::type_name::<Q>() == std::any::type_name::<T>() {
            true => format!("{dtype} (the inputs' dtype)"),
            false => format!("{dtype} (the dtype computed in)"),
        };
        if !finite(self.scale) {
            return Err(KernelError::invalid(
                "scale",
                format!("must be finite in {dtype} (the inputs' dtype), got {}", self.scale),
            ));
        }
        if let Some(c) = self.softcap.filter(|&c| !(finite(c) && c > 0.0)) {
            return Err(KernelError::invalid(
                "softcap",
                format!("must be a positive number, finite in {dtype} (the inputs' dtype), got {c}"),
            ));
        }
        if let Some(s) = masks.sinks {
            if s.len() != self.heads_q {
                return Err(KernelError::invalid(
                    "sinks",
                    format!("has {} elements, expected Hq ({})", s.len(), self.heads_q),
                ));
            }
            if let Some(bad) = s.iter().find(|&&x| !finite(x)) {
                return Err(KernelError::invalid("sinks", format!("must be finite in {dtype}, got {bad}")));
            }
        }
        if let Some(bad) = masks.alibi.and_then(|a| a.iter().find(|&&x| !finite(x))) {
            return Err(KernelError::invalid(
                "alibi_slopes",
                format!("must be finite in {dtype} (the inputs' dtype), got {bad}"),
            ));
        }
        let checks = [
            ("query", q.len(), self.q, self.heads_q, self.q_len, self.dim_qk),
            ("key", k.len(), self.k, self.heads_kv, self.kv_len, self.dim_qk),
            ("value", v.len(), self.v, self.heads_kv, self.kv_len, self.dim_v),
        ];
        for (arg, len, strides, heads, rows, row_len) in checks {
            if last_index(len, strides, self.batch, heads, rows, row_len).is_none() {
                return Err(KernelError::invalid(arg, "strides and shape reach past the data"));
            }
        }
        let extents = [self.batch, self.heads_q, self.q_len, self.kv_len];
        if masks.bool_mask.as_ref().is_some_and(|m| !m.fits(extents))
            || masks.float_mask.as_ref().is_some_and(|m| !m.fits(extents))
        {
            return Err(KernelError::invalid("attn_mask", "strides and shape reach past the data"));
        }
        if let Some(km) = masks.key_mask {
            if Some(km.len()) != self.batch.checked_mul(self.kv_len) {
                return Err(KernelError::invalid(
                    "key_mask",
                    format!("has {} elements, expected batch * S", km.len()),
                ));
            }
        }
        if let Some(n) = masks.key_lengths {
            self.check_counts("key_lengths", n, self.kv_len, "S, the keys given")?;
        }
        if let Some(starts) = masks.key_starts {
            let Some(lengths) = masks.key_lengths.filter(|_| starts.len() == self.batch) else {
                return Err(KernelError::invalid(
                    "key_starts",
                    format!(
                        "needs key_lengths, and one start per batch item ({}); got {}",
                        self.batch,
                        starts.len()
                    ),
                ));
            };
            let s = self.kv_len as i64;
            if let Some((b, (&start, &n))) =
                starts.iter().zip(lengths).enumerate().find(|(_, (&start, &n))| start < 0 || start > s - n)
            {
                return Err(KernelError::invalid(
                    "key_starts",
                    format!("item {b}'s {n} keys from row {start} do not fit the {s} rows given"),
                ));
            }
        }
        if self.k_strips {
            let strips = KEY_STRIP;
            if self.k.row != self.dim_qk || !self.kv_len.is_multiple_of(strips) {
                return Err(KernelError::invalid(
                    "key",
                    format!("strips of {strips} keys need rows of E elements and S a multiple of {strips}"),
                ));
            }
            if let Some(bad) = masks.key_starts.and_then(|s| s.iter().find(|&&x| x % strips as i64 != 0)) {
                return Err(KernelError::invalid(
                    "key_starts",
                    format!("must be multiples of {strips} for keys stored in strips, got {bad}"),
                ));
            }
        }
        if let Some(n) = masks.query_lengths {
            self.check_counts("query_lengths", n, self.q_len, "L, the queries given")?;
        }
        if let Some(a) = masks.alibi {
            if a.len() != self.heads_q && Some(a.len()) != self.batch.checked_mul(self.heads_q) {
                return Err(KernelError::invalid(
                    "alibi_slopes",
                    format!("has {} elements, expected Hq or batch * Hq", a.len()),
                ));
            }
        }
        let rows = product(&[self.batch, self.heads_q, self.q_len]);
        let sizes = [
            ("out", Some(outputs.out.len()), rows.and_then(|r| r.checked_mul(self.dim_v))),
            ("lse", outputs.lse.as_ref().map(|l| l.len()), rows),
            (
                "weights",
                outputs.weights.as_ref().map(|w| w.len()),
                rows.and_then(|r| r.checked_mul(self.kv_len)),
            ),
            (
                "scores",
                outputs.scores.as_ref().map(|w| w.len()),
                rows.and_then(|r| r.checked_mul(self.kv_len)),
            ),
        ];
        for (arg, got, expected) in sizes {
            if let Some(len) = got {
                expect_len(arg, len, expected)?;
            }
        }
        Ok(())
    }
}

/// Each (batch, query head)'s `n` elements of an optional `(batch, Hq, ...)` output.
fn per_head<X>(x: Option<&mut [X]>, n: usize, pairs: usize) -> Vec<Option<&mut [X]>> {
    match x {
        Some(w) if n > 0 => w.chunks_mut(n).map(Some).collect(),
        _ => (0..pairs).map(|_| None).collect(),
    }
}

/// Tasks a thread should have to choose from, so an unlucky last task does not leave the others
/// idle.
const TASKS_PER_THREAD: usize = 4;

/// Computes attention for every (batch, query head) into `outputs`: queries stored as `Q`, keys
/// and values as `KV`, both computed in `T`; the output is stored as `Q`, `lse` and weights as
/// `T`.
pub fn attention<Q, KV, T>(
    q: &[Q],
    k: &[KV],
    v: &[KV],
    spec: &AttnSpec,
    masks: &Masks<'_, T>,
    outputs: Outputs<'_, Q, T>,
    par: Par<'_>,
) -> Result<(), KernelError>
where
    Q: Storage<Compute = T>,
    KV: Storage<Compute = T>,
    T: AttnFloat,
{
    spec.check(q, k, v, masks, &outputs)?;
    let pairs = spec.batch * spec.heads_q;
    if pairs == 0 || spec.q_len == 0 {
        return Ok(());
    }
    let (l, s, ev) = (spec.q_len, spec.kv_len, spec.dim_v);
    // Each (batch, query head)'s rows of out, lse and weights ...
    let outs: Vec<&mut [MaybeUninit<Q>]> = match ev {
        0 => (0..pairs).map(|_| Default::default()).collect(),
        _ => outputs.out.chunks_mut(l * ev).collect(),
    };
    let lses: Vec<Option<&mut [MaybeUninit<T>]>> = match outputs.lse {
        Some(lse) => lse.chunks_mut(l).map(Some).collect(),
        None => (0..pairs).map(|_| None).collect(),
    };
    // (The scores of every pair are kept where the weights or the scores are asked for.)
    let has_weights = (outputs.weights.is_some() || outputs.scores.is_some()) && s > 0;
    let (weights, scores) = (per_head(outputs.weights, l * s, pairs), per_head(outputs.scores, l * s, pairs));
    // ... gathered into one task per (batch, key/value head) with the query heads that share it.
    let group = spec.heads_q / spec.heads_kv;
    let mut heads = outs
        .into_iter()
        .zip(lses)
        .zip(weights)
        .zip(scores)
        .map(|(((out, lse), weights), scores)| tile::HeadOut { out, lse, weights, scores });
    let flops = 2.0 * (l as f64) * (s as f64) * ((spec.dim_qk + ev) as f64) * pairs as f64;
    // Task t works on batch t / Hkv, key/value head t % Hkv.
    let inputs = |t: usize| TaskInputs {
        q,
        k,
        v,
        spec,
        masks,
        b: t / spec.heads_kv,
        g: t % spec.heads_kv,
        group,
        par,
    };
    let par = if flops > 1e6 { par } else { par.sequential() };
    // bfloat16 queries over bfloat16 keys in strips (a `KVCache`'s) take the tiled path's pair
    // mode (`dot16.rs`) at any length, so that decoding gives the bits of one long call.
    let pair_mode = spec.k_strips && Q::as_bf16(q).is_some() && KV::as_bf16(k).is_some() && dot16::fits(ev);
    if l <= decode::MAX_QUERIES && !pair_mode {
        // Short queries: one task per (batch, key/value head, chunk of keys), then one merge per
        // (batch, key/value head).
        let n_chunks = s.div_ceil(merge::CHUNK).max(1);
        let mut chunks: Vec<decode::Chunk<'_, Q, KV, T>> = (0..spec.batch * spec.heads_kv * n_chunks)
            .map(|t| {
                let c = t % n_chunks;
                decode::Chunk {
                    at: inputs(t / n_chunks),
                    keys: (c * merge::CHUNK, ((c + 1) * merge::CHUNK).min(s)),
                    weights: has_weights,
                    partial: Default::default(),
                }
            })
            .collect();
        let mut heads: Vec<tile::HeadOut<'_, Q, T>> = heads.collect();
        par.for_each(&mut chunks, simd::task);
        // Then one merge per (batch, key/value head), for its query heads: each row's outputs
        // once per chunk. Short, but a prefill of short sequences has one per (batch, head),
        // which on the calling thread alone left the other threads idle.
        let mut merges: Vec<decode::Merge<'_, '_, '_, '_, Q, KV, T>> = chunks
            .chunks(n_chunks)
            .zip(heads.chunks_mut(group))
            .map(|(chunks, heads)| decode::Merge { spec, chunks, heads })
            .collect();
        par.for_each(&mut merges, simd::task);
        return Ok(());
    }
    // One task per (batch, key/value head), split along the queries into parts of whole query
    // blocks when that gives fewer than TASKS_PER_THREAD tasks a thread, so that every thread
    // stays busy to the end. Which task computes a row never changes its bits.
    let groups = spec.batch * spec.heads_kv;
    let unit = tile::positions_per_unit(group);
    let units = l.div_ceil(unit);
    let parts = match par.threads() {
        1 => 1,
        threads => (TASKS_PER_THREAD * threads).div_ceil(groups).clamp(1, units),
    };
    // Part p holds the query positions [bound(p), bound(p + 1)).
    let bound = |p: usize| (p * units / parts * unit).min(l);
    let mut tasks: Vec<tile::Group<'_, '_, Q, KV, T>> = Vec::with_capacity(groups * parts);
    for t in 0..groups {
        let mut rest: Vec<tile::HeadOut<'_, Q, T>> = heads.by_ref().take(group).collect();
        for p in (0..parts).rev() {
            // Split off the last part first: with causal masks, later parts hold more work, and
            // tasks are taken in order.
            let first = bound(p);
            let part = rest.iter_mut().map(|h| h.split_off(first, ev, s)).collect();
            tasks.push(tile::Group { at: inputs(t), first, positions: bound(p + 1) - first, heads: part });
        }
    }
    // The heaviest parts (the last of each group) first.
    tasks.sort_by_key(|task| std::cmp::Reverse(task.first));
    par.for_each(&mut tasks, simd::task);
    Ok(())
}

/// Merges `parts` partial results over disjoint key sets, `outs` `(parts, rows, ev)` and `lses`
/// `(parts, rows)`, into `out` `(rows, ev + 1)`: each row's merged output, then its log-sum-exp
/// (`merge.rs`, the arithmetic the kernels finish with, so that the results of calls over a row's
/// chunks of keys merge to the bits of one call over all of them). A partial with lse −inf is
/// left out; NaN, once met, stays.
pub fn merge_attention<T: AttnFloat>(
    outs: &[T],
    lses: &[T],
    parts: usize,
    ev: usize,
    out: &mut [MaybeUninit<T>],
    par: Par<'_>,
) -> Result<(), KernelError> {
    let rows = lses.len().checked_div(parts).unwrap_or(0);
    expect_len("lses", lses.len(), parts.checked_mul(rows))?;
    expect_len("outs", outs.len(), product(&[parts, rows, ev]))?;
    expect_len("out", out.len(), rows.checked_mul(ev + 1))?;
    crate::kernels::for_each_row_block(out, ev + 1, par, &Merge { outs, lses, parts, rows, ev });
    Ok(())
}

/// [`merge_attention`]'s rows.
struct Merge<'a, T> {
    outs: &'a [T],
    lses: &'a [T],
    parts: usize,
    rows: usize,
    ev: usize,
}

impl<T: AttnFloat> crate::kernels::Rows<MaybeUninit<T>> for Merge<'_, T> {
    #[inline(always)]
    fn rows(&self, first: usize, block: &mut [MaybeUninit<T>]) {
        let (parts, rows, ev) = (self.parts, self.rows, self.ev);
        let (mut lses, mut factors, mut row) =
            (vec![T::ZERO; parts], vec![T::ZERO; parts], vec![T::ZERO; ev]);
        for (i, dst) in block.chunks_exact_mut(ev + 1).enumerate() {
            let r = first + i;
            for (c, l) in lses.iter_mut().enumerate() {
                *l = self.lses[c * rows + r];
            }
            let out_of = |c: usize| &self.outs[(c * rows + r) * ev..(c * rows + r + 1) * ev];
            let lse = merge::merge_row(&lses, out_of, None, &mut row, &mut factors);
            for (d, &x) in dst.iter_mut().zip(row.iter().chain([&lse])) {
                d.write(x);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::output::{collect, collect_pair};

    struct Case {
        spec: AttnSpec,
        q: Vec<f64>,
        k: Vec<f64>,
        v: Vec<f64>,
        bool_mask: Option<Vec<u8>>,
        key_mask: Option<Vec<u8>>,
    }

    fn strides(heads: usize, rows: usize, dim: usize) -> Strides {
        Strides { batch: heads * rows * dim, head: rows * dim, row: dim }
    }

    fn case(b: usize, hq: usize, hkv: usize, l: usize, s: usize, e: usize, ev: usize) -> Case {
        let gen = |n: usize, seed: usize| -> Vec<f64> {
            (0..n).map(|i| (((i * 7919 + seed * 104729) % 1000) as f64) / 500.0 - 1.0).collect()
        };
        let spec = AttnSpec {
            batch: b,
            heads_q: hq,
            heads_kv: hkv,
            q_len: l,
            kv_len: s,
            dim_qk: e,
            dim_v: ev,
            q: strides(hq, l, e),
            k: strides(hkv, s, e),
            v: strides(hkv, s, ev),
            scale: 1.0 / (e as f64).sqrt(),
            softcap: None,
            causal: false,
            window: (None, None),
            alignment: Alignment::TopLeft,
            k_strips: false,
        };
        Case {
            spec,
            q: gen(b * hq * l * e, 1),
            k: gen(b * hkv * s * e, 2),
            v: gen(b * hkv * s * ev, 3),
            bool_mask: None,
            key_mask: None,
        }
    }

    /// The formula, one query row at a time, in float64, leaving invalid keys out entirely.
    fn naive(c: &Case) -> (Vec<f64>, Vec<f64>) {
        let sp = &c.spec;
        let (l, s, e, ev) = (sp.q_len, sp.kv_len, sp.dim_qk, sp.dim_v);
        let offset = if sp.alignment == Alignment::BottomRight { s as isize - l as isize } else { 0 };
        let (mut out, mut lse) = (vec![], vec![]);
        for b in 0..sp.batch {
            for h in 0..sp.heads_q {
                let g = h / (sp.heads_q / sp.heads_kv);
                for i in 0..l {
                    let pos = i as isize + offset;
                    let mut scores = vec![];
                    for j in 0..s {
                        let jp = j as isize;
                        let ok = !(sp.causal && jp > pos)
                            && sp.window.0.is_none_or(|w| jp >= pos - w as isize)
                            && sp.window.1.is_none_or(|w| jp <= pos + w as isize)
                            && c.key_mask.as_ref().is_none_or(|km| km[b * s + j] != 0)
                            && c.bool_mask
                                .as_ref()
                                .is_none_or(|bm| bm[((b * sp.heads_q + h) * l + i) * s + j] != 0);
                        if ok {
                            let qr = &c.q[((b * sp.heads_q + h) * l + i) * e..][..e];
                            let kr = &c.k[((b * sp.heads_kv + g) * s + j) * e..][..e];
                            scores.push((j, sp.scale * qr.iter().zip(kr).map(|(x, y)| x * y).sum::<f64>()));
                        }
                    }
                    let m = scores.iter().map(|x| x.1).fold(f64::NEG_INFINITY, f64::max);
                    let total: f64 = scores.iter().map(|x| (x.1 - m).exp()).sum();
                    for d in 0..ev {
                        let num: f64 = scores
                            .iter()
                            .map(|&(j, sc)| (sc - m).exp() * c.v[((b * sp.heads_kv + g) * s + j) * ev + d])
                            .sum();
                        out.push(if scores.is_empty() { 0.0 } else { num / total });
                    }
                    lse.push(if scores.is_empty() { f64::NEG_INFINITY } else { m + total.ln() });
                }
            }
        }
        (out, lse)
    }

    fn run(c: &Case, par: Par<'_>) -> (Vec<f64>, Vec<f64>) {
        let sp = &c.spec;
        let rows = sp.batch * sp.heads_q * sp.q_len;
        let bm = c.bool_mask.as_ref().map(|d| StridedMask {
            data: &d[..],
            strides: [sp.heads_q * sp.q_len * sp.kv_len, sp.q_len * sp.kv_len, sp.kv_len, 1],
        });
        let masks = Masks { bool_mask: bm, key_mask: c.key_mask.as_deref(), ..Default::default() };
        let mut out = vec![];
        let lse = collect("lse", rows, |lse| {
            out = collect("out", rows * sp.dim_v, |o| {
                attention(
                    &c.q,
                    &c.k,
                    &c.v,
                    sp,
                    &masks,
                    Outputs { out: o, lse: Some(&mut *lse), weights: None, scores: None },
                    par,
                )
            })?;
            Ok(())
        })
        .unwrap();
        (out, lse)
    }

    fn assert_close(got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(g == w || (g - w).abs() <= 1e-12, "element {i}: {g} vs {w}");
        }
    }

    #[test]
    fn matches_naive_formula_with_every_mask_kind() {
        let mut c = case(2, 4, 2, 37, 70, 5, 3);
        assert_close(&run(&c, Par::SEQ).0, &naive(&c).0);
        c.spec.causal = true;
        c.spec.alignment = Alignment::BottomRight;
        let (out, lse) = run(&c, Par::SEQ);
        let (want_out, want_lse) = naive(&c);
        assert_close(&out, &want_out);
        assert_close(&lse, &want_lse);
        c.spec.causal = false;
        c.spec.window = (Some(5), Some(2));
        c.key_mask = Some((0..2 * 70).map(|i| u8::from(i % 70 < 50 - 20 * (i / 70))).collect());
        c.bool_mask = Some((0..2 * 4 * 37 * 70).map(|i| u8::from(i % 3 != 0)).collect());
        assert_close(&run(&c, Par::SEQ).0, &naive(&c).0);
    }

    #[test]
    fn fully_masked_rows_give_zeros_and_minus_infinity() {
        let mut c = case(1, 1, 1, 3, 4, 2, 2);
        c.key_mask = Some(vec![0; 4]);
        let (out, lse) = run(&c, Par::SEQ);
        assert!(out.iter().all(|&x| x == 0.0));
        assert!(lse.iter().all(|&x| x == f64::NEG_INFINITY));
        let mut c = case(1, 1, 1, 3, 0, 2, 2); // no keys at all
        c.spec.causal = true;
        assert!(run(&c, Par::SEQ).0.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn masked_keys_and_values_never_enter_the_arithmetic() {
        let mut c = case(1, 2, 1, 9, 130, 4, 4);
        c.key_mask = Some((0..130).map(|j| u8::from(j % 5 != 0)).collect());
        let want = run(&c, Par::SEQ).0;
        for j in (0..130).step_by(5) {
            c.k[j * 4..j * 4 + 4].fill(f64::NAN);
            c.v[j * 4..j * 4 + 4].fill(f64::INFINITY);
        }
        assert_eq!(run(&c, Par::SEQ).0, want);
    }

    #[test]
    fn thread_count_does_not_change_the_bits() {
        let c = case(3, 4, 4, 45, 90, 8, 8);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        assert_eq!(run(&c, Par::SEQ), run(&c, Par::on(&pool)));
    }

    #[test]
    fn rejects_bad_heads_scale_and_lengths() {
        let mut c = case(1, 3, 2, 2, 2, 2, 2);
        let bad = |c: &Case| {
            let n = c.spec.batch * c.spec.heads_q * c.spec.q_len;
            let masks = Masks::default();
            collect_pair(("out", "lse"), n * c.spec.dim_v, |o, _| {
                attention(
                    &c.q,
                    &c.k,
                    &c.v,
                    &c.spec,
                    &masks,
                    Outputs { out: o, lse: None, weights: None, scores: None },
                    Par::SEQ,
                )
            })
            .is_err()
        };
        assert!(bad(&c), "3 query heads cannot share 2 key/value heads");
        c = case(1, 2, 2, 2, 2, 2, 2);
        c.spec.scale = f64::NAN;
        assert!(bad(&c));
        c = case(1, 2, 2, 2, 2, 2, 2);
        c.k.pop();
        assert!(bad(&c));
    }
}
