//! `y = x · Wᵀ` for a quantized weight matrix W (n rows of k elements) and m activation
//! rows. W is repacked at load ([`crate::packed`]); activations are quantized once per
//! row; each task owns a range of 16-row groups and runs every activation row against a
//! group while it is in cache, so a batch of m rows reads the weights once, not m times.

use crate::formats::{dequantize, QK};
pub use crate::formats::{Arithmetic, QFormat};
use crate::packed::{quantize_acts, Act, Packed, ROWS};
use crate::team;
use crate::OutPtr;

#[derive(Debug, PartialEq, Eq)]
pub enum QMatrixError {
    /// The row length is not a whole number of the format's blocks.
    RowLength { k: usize, block: usize },
    /// The byte count does not match n × k.
    Size { expected: usize, got: usize },
}

impl std::fmt::Display for QMatrixError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::RowLength { k, block } => {
                write!(
                    f,
                    "row length {k} is not a multiple of the block size {block}"
                )
            }
            Self::Size { expected, got } => {
                write!(f, "expected {expected} bytes of blocks, got {got}")
            }
        }
    }
}

impl std::error::Error for QMatrixError {}

/// A quantized weight matrix: `n` rows of `k` elements.
pub struct QMatrix {
    k: usize,
    packed: Packed,
}

impl QMatrix {
    /// Reads GGUF block bytes of an n × k matrix (rows in file order) and packs them.
    pub fn from_bytes(
        format: QFormat,
        bytes: &[u8],
        n: usize,
        k: usize,
    ) -> Result<Self, QMatrixError> {
        let block = format.block_elems();
        if !k.is_multiple_of(block) || k == 0 {
            return Err(QMatrixError::RowLength { k, block });
        }
        let expected = n * (k / block) * format.block_bytes();
        if bytes.len() != expected {
            return Err(QMatrixError::Size {
                expected,
                got: bytes.len(),
            });
        }
        Ok(Self {
            k,
            packed: Packed::from_gguf(format, bytes, n, k),
        })
    }

    pub fn format(&self) -> QFormat {
        self.packed.format()
    }

    pub fn arithmetic(&self) -> Arithmetic {
        self.packed.arithmetic()
    }

    /// How dot products are summed (the default: llama.cpp's lanes, bit for bit).
    pub fn set_arithmetic(&mut self, arithmetic: Arithmetic) {
        self.packed.set_arithmetic(arithmetic);
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.packed.rows()
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Row `r` as f32 (an embedding lookup), dequantized as ggml does.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        for (b, o) in out.chunks_exact_mut(QK).enumerate() {
            dequantize(self.format(), &self.packed.decoded(r, b), o);
        }
    }

    /// `out[i * n + j] = dot(x row i, W row j)` for `m = x.len() / k` rows.
    pub fn matmul(&self, x: &[f32], out: &mut [f32]) {
        self.matmul_parts(x, &mut [out]);
    }

    /// [`Self::matmul`] with the output columns split among `parts`: part `p` receives
    /// the next `parts[p].len() / m` columns of every row, as a matrix of its own (the
    /// q, k and v of a stacked projection, each where it is used, without a copy).
    pub fn matmul_parts(&self, x: &[f32], parts: &mut [&mut [f32]]) {
        self.matmul_parts_with(Input::Rows(x), parts, Output::Set);
    }

    /// [`Self::matmul_parts`] with the activation rows from `input` (given, or made row
    /// by row inside the matmul's parallel pass) and the products stored or added into
    /// `parts`.
    pub fn matmul_parts_with(&self, input: Input<'_>, parts: &mut [&mut [f32]], output: Output) {
        let (n, k) = (self.rows(), self.k);
        let m = match input {
            Input::Rows(x) => {
                assert_eq!(x.len() % k, 0, "activation length is not a multiple of k");
                x.len() / k
            }
            Input::Made { rows, cols, .. } => {
                assert_eq!(cols, k, "made rows of k columns");
                rows
            }
        };
        if m == 0 {
            assert!(parts.iter().all(|p| p.is_empty()), "output for no rows");
            return;
        }
        let mut dest = Vec::with_capacity(parts.len());
        let mut start = 0;
        for part in parts.iter_mut() {
            assert_eq!(part.len() % m, 0, "a part's length is not a multiple of m");
            let width = part.len() / m;
            let rows = (0..m)
                .map(|c| OutPtr(part[c * width..].as_mut_ptr()))
                .collect();
            dest.push((start, width, rows));
            start += width;
        }
        assert_eq!(start, n, "the parts' widths add up to the matrix's rows");
        self.matmul_into(input, m, &dest, output);
    }

    /// [`Self::matmul`] with each output row in a vector of its own (row `i` of `x`'s
    /// product: all `rows()` columns): a batch's logits, one vector per sequence, with
    /// no copy and no zeroing first (16 sequences' logits are 3 MB a step).
    pub fn matmul_rows(&self, x: &[f32]) -> Vec<Vec<f32>> {
        let (n, k) = (self.rows(), self.k);
        assert_eq!(x.len() % k, 0, "activation length is not a multiple of k");
        let m = x.len() / k;
        let mut out: Vec<Vec<f32>> = (0..m).map(|_| Vec::with_capacity(n)).collect();
        if m == 0 {
            return out;
        }
        let rows = out.iter_mut().map(|r| OutPtr(r.as_mut_ptr())).collect();
        self.matmul_into(Input::Rows(x), m, &[(0, n, rows)], Output::Set);
        for r in &mut out {
            // SAFETY: the one part covers the matrix's rows, so the matmul stored every
            // one of the `n` columns of every row (within the capacity of `n`).
            unsafe { r.set_len(n) };
        }
        out
    }

    /// The product of `m` activation rows, column `j` of row `c` written through
    /// `dest`: the part `(start, width, rows)` with `start <= j < start + width` takes it
    /// at `rows[c] + (j - start)`. The parts cover the matrix's rows; each pointer is
    /// valid for `width` writes (or reads and writes, to add).
    fn matmul_into(
        &self,
        input: Input<'_>,
        m: usize,
        dest: &[(usize, usize, Vec<OutPtr>)],
        output: Output,
    ) {
        let (n, k) = (self.rows(), self.k);
        let nb = k / QK;
        let bias = self.format().bias();
        // Rows `first..` quantized into `q` (whole rows).
        let quantize = |first: usize, q: &mut [Act]| {
            let rows = first..first + q.len() / nb;
            match input {
                Input::Rows(x) => quantize_acts(&x[rows.start * k..rows.end * k], bias, q),
                Input::Made { make, .. } => crate::with_reused(&MADE, |x| {
                    // Grown, never cut: a cut refilled by the next longer call would be
                    // a pass of its own (`make` writes every value it is given).
                    let len = rows.len() * k;
                    if x.len() < len {
                        x.resize(len, 0.0);
                    }
                    make(rows, &mut x[..len]);
                    quantize_acts(&x[..len], bias, q)
                }),
            }
        };
        let add = output == Output::Add;
        crate::with_reused(&ACTS, |acts| {
            // Grown, never cut, for the same reason (every block is written before read).
            if acts.len() < m * nb {
                acts.resize(m * nb, Act::default());
            }
            let acts = &mut acts[..m * nb];
            // A few rows a task (made rows often come in groups faster than one by one,
            // e.g. norms), two tasks or more per thread.
            let per = (m / (2 * rayon::current_num_threads())).clamp(1, 8);
            if m > per {
                team::for_each_chunk_mut(acts, per * nb, || (), |_, i, q| quantize(i * per, q));
            } else {
                quantize(0, acts);
            }
            let rows_a: Vec<&[Act]> = acts.chunks_exact(nb).collect();
            let groups = self.packed.groups();
            // Contiguous groups per thread, so that each group's prefetch of the next
            // one serves the thread that computes it; short last pieces even out the ends.
            team::for_each_range(
                groups,
                || vec![[0f32; ROWS]; m],
                |tile, range| {
                    for g in range {
                        let (lo, hi) = (g * ROWS, (g * ROWS + ROWS).min(n));
                        self.packed.group_dot(g, &rows_a, tile, true);
                        for (start, width, rows) in dest {
                            let (start, width) = (*start, *width);
                            let (a, b) = (lo.max(start), hi.min(start + width));
                            if a >= b {
                                continue;
                            }
                            for (t, p) in tile.iter().zip(rows) {
                                // SAFETY: start <= a < b <= start + width, so the range
                                // lies in the row's `width` columns; columns a..b belong
                                // to this task's group alone.
                                unsafe {
                                    let dst = p.0.add(a - start);
                                    if b - a == ROWS {
                                        // A whole group: one 64-byte move, not a call.
                                        let dst = dst as *mut [f32; ROWS];
                                        let mut v = *t;
                                        if add {
                                            let old = dst.read_unaligned();
                                            v.iter_mut().zip(old).for_each(|(v, o)| *v += o);
                                        }
                                        dst.write_unaligned(v);
                                    } else if add {
                                        for (j, &v) in t[a - lo..b - lo].iter().enumerate() {
                                            *dst.add(j) += v;
                                        }
                                    } else {
                                        std::ptr::copy_nonoverlapping(
                                            t.as_ptr().add(a - lo),
                                            dst,
                                            b - a,
                                        )
                                    }
                                };
                            }
                        }
                    }
                    crate::amx::release();
                },
            );
        });
    }
}

thread_local! {
    /// Each thread's buffer of quantized activation rows, reused from call to call.
    static ACTS: std::cell::RefCell<Vec<Act>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Each thread's buffer for an activation row made on demand ([`Input::Made`]).
    static MADE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Where a matmul's activation rows come from.
#[derive(Clone, Copy)]
pub enum Input<'a> {
    /// The rows, one after another.
    Rows(&'a [f32]),
    /// `rows` rows of `cols` values made on demand: `make(range, out)` writes the rows
    /// `range` to `out` (`range.len() · cols` values), on this thread alone. Each row is
    /// made once, in the matmul's own parallel pass over the rows (where they are
    /// quantized, a few at a time), so a norm or an activation function before a matmul
    /// needs no pass and no buffer of its own.
    Made {
        rows: usize,
        cols: usize,
        make: &'a (dyn Fn(std::ops::Range<usize>, &mut [f32]) + Sync),
    },
}

impl Input<'_> {
    /// The rows as one buffer: borrowed, or made one after another.
    pub fn rows(&self) -> std::borrow::Cow<'_, [f32]> {
        match *self {
            Input::Rows(x) => std::borrow::Cow::Borrowed(x),
            Input::Made { rows, cols, make } => {
                let mut x = vec![0f32; rows * cols];
                make(0..rows, &mut x);
                std::borrow::Cow::Owned(x)
            }
        }
    }
}

/// What a matmul does with its products.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Output {
    /// Store them.
    Set,
    /// Add them to what the output holds (a residual connection, with no pass of its own).
    Add,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::{decode, Decoded};
    use crate::packed::dot_ref;

    fn q4_1_bytes(n: usize, k: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for r in 0..n {
            for b in 0..k / QK {
                let d = half::f16::from_f32(0.01 * (1 + (r + b) % 5) as f32);
                let m = half::f16::from_f32(-0.05 * (r % 3) as f32);
                out.extend(d.to_bits().to_le_bytes());
                out.extend(m.to_bits().to_le_bytes());
                out.extend((0..16).map(|j| ((r * 7 + b * 3 + j * 5) % 256) as u8));
            }
        }
        out
    }

    #[test]
    fn matmul_matches_row_by_row_reference() {
        let (n, k, m) = (37, 96, 5);
        let bytes = q4_1_bytes(n, k);
        let w = QMatrix::from_bytes(QFormat::Q4_1, &bytes, n, k).unwrap();
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let mut out = vec![0f32; m * n];
        w.matmul(&x, &mut out);
        for i in 0..m {
            let mut a = vec![Act::default(); k / QK];
            quantize_acts(&x[i * k..(i + 1) * k], 0, &mut a);
            for r in 0..n {
                let row: Vec<Decoded> = bytes[r * 60..(r + 1) * 60]
                    .chunks_exact(20)
                    .map(|b| {
                        let mut d = [Decoded::default()];
                        decode(QFormat::Q4_1, b, &mut d);
                        d[0]
                    })
                    .collect();
                let want = dot_ref(QFormat::Q4_1, Arithmetic::Lanes, &row, &a);
                assert_eq!(out[i * n + r].to_bits(), want.to_bits(), "row {i} col {r}");
            }
        }
        // Split among parts: the same numbers, each part a matrix of its own columns.
        let (mut a, mut b, mut c) = (vec![0f32; m * 5], vec![0f32; m * 16], vec![0f32; m * 16]);
        w.matmul_parts(&x, &mut [&mut a, &mut b, &mut c]);
        for i in 0..m {
            let row = &out[i * n..(i + 1) * n];
            assert_eq!(&a[i * 5..(i + 1) * 5], &row[..5]);
            assert_eq!(&b[i * 16..(i + 1) * 16], &row[5..21]);
            assert_eq!(&c[i * 16..(i + 1) * 16], &row[21..]);
        }
        // Each row in a vector of its own: the same numbers.
        let rows = w.matmul_rows(&x);
        assert_eq!(rows.len(), m);
        for (i, r) in rows.iter().enumerate() {
            assert_eq!(&r[..], &out[i * n..(i + 1) * n], "row {i} on its own");
        }
        // No rows: nothing to do.
        w.matmul(&[], &mut []);
        assert!(w.matmul_rows(&[]).is_empty());
        // Batching does not change any row's result.
        let mut single = vec![0f32; n];
        w.matmul(&x[2 * k..3 * k], &mut single);
        assert_eq!(&single[..], &out[2 * n..3 * n]);
    }

    #[test]
    fn made_rows_and_added_products_equal_given_rows_and_a_separate_sum() {
        // 37 rows: a partial last group, so the added products take both store paths.
        let (n, k) = (37, 96);
        let w = QMatrix::from_bytes(QFormat::Q4_1, &q4_1_bytes(n, k), n, k).unwrap();
        for m in [1, 5, 16, 37] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            let mut want = vec![0f32; m * n];
            w.matmul(&x, &mut want);
            // Rows made on demand (each exactly once, whichever thread makes it).
            let made = (0..m)
                .map(|_| std::sync::atomic::AtomicUsize::new(0))
                .collect::<Vec<_>>();
            let make = |rows: std::ops::Range<usize>, out: &mut [f32]| {
                out.copy_from_slice(&x[rows.start * k..rows.end * k]);
                for r in rows {
                    made[r].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            };
            let input = Input::Made {
                rows: m,
                cols: k,
                make: &make,
            };
            let mut got = vec![f32::NAN; m * n];
            w.matmul_parts_with(input, &mut [&mut got], Output::Set);
            assert_eq!(got, want, "{m} made rows");
            assert!(made
                .iter()
                .all(|c| c.load(std::sync::atomic::Ordering::Relaxed) == 1));
            assert_eq!(&input.rows()[..], &x[..]);
            // Added to what the output holds, as `base + product` is, in every column.
            let base: Vec<f32> = (0..m * n).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
            let mut sum = base.clone();
            w.matmul_parts_with(Input::Rows(&x), &mut [&mut sum], Output::Add);
            for (i, (s, (b, p))) in sum.iter().zip(base.iter().zip(&want)).enumerate() {
                assert_eq!(s.to_bits(), (b + p).to_bits(), "{m} rows, element {i}");
            }
        }
    }

    #[test]
    fn wrong_sizes_are_errors() {
        assert_eq!(
            QMatrix::from_bytes(QFormat::Q8_0, &[0; 10], 1, 32).err(),
            Some(QMatrixError::Size {
                expected: 34,
                got: 10
            })
        );
        assert_eq!(
            QMatrix::from_bytes(QFormat::Q8_0, &[], 1, 33).err(),
            Some(QMatrixError::RowLength { k: 33, block: 32 })
        );
        assert_eq!(
            QMatrix::from_bytes(QFormat::Q4K, &[], 1, 96).err(),
            Some(QMatrixError::RowLength { k: 96, block: 256 })
        );
    }
}
