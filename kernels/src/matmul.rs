//! `y = x · Wᵀ` for a quantized weight matrix W (n rows of k elements) and m activation
//! rows. Activations are quantized once per row; each task owns a band of weight rows and
//! runs it against every activation row while the band is in cache, so a batch of m rows
//! reads the weights once, not m times.

use rayon::prelude::*;

use crate::blocks::{read_blocks, BlockQ4_0, BlockQ4_1, BlockQ8_0, GgmlBlock, QK};
use crate::dot;
use crate::gemm::{self, TileOut, TILE_COLS, TILE_ROWS};
use crate::quantize::{quantize_row_q8_0, quantize_row_q8_1};

#[derive(Debug, PartialEq, Eq)]
pub enum QMatrixError {
    /// The row length is not a whole number of blocks.
    RowLength { k: usize },
    /// The byte count does not match n × k.
    Size { expected: usize, got: usize },
}

impl std::fmt::Display for QMatrixError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::RowLength { k } => write!(f, "row length {k} is not a multiple of {QK}"),
            Self::Size { expected, got } => {
                write!(f, "expected {expected} bytes of blocks, got {got}")
            }
        }
    }
}

impl std::error::Error for QMatrixError {}

enum Data {
    Q4_0(Vec<BlockQ4_0>),
    Q4_1(Vec<BlockQ4_1>),
    Q8_0(Vec<BlockQ8_0>),
}

/// A quantized weight matrix, row-major: `n` rows of `k` elements.
pub struct QMatrix {
    n: usize,
    k: usize,
    data: Data,
}

/// Which weight formats [`QMatrix`] handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QFormat {
    Q4_0,
    Q4_1,
    Q8_0,
}

/// Weight rows per task: small enough to balance two to many threads, large enough that
/// scheduling costs little next to the dots.
const BAND: usize = 16;

fn blocks<B: GgmlBlock>(bytes: &[u8], n: usize, k: usize) -> Result<Vec<B>, QMatrixError> {
    let expected = n * (k / QK) * B::BYTES;
    if bytes.len() != expected {
        return Err(QMatrixError::Size {
            expected,
            got: bytes.len(),
        });
    }
    Ok(read_blocks(bytes))
}

impl QMatrix {
    /// Reads GGUF block bytes of an n × k matrix.
    pub fn from_bytes(
        format: QFormat,
        bytes: &[u8],
        n: usize,
        k: usize,
    ) -> Result<Self, QMatrixError> {
        if !k.is_multiple_of(QK) || k == 0 {
            return Err(QMatrixError::RowLength { k });
        }
        let data = match format {
            QFormat::Q4_0 => Data::Q4_0(blocks(bytes, n, k)?),
            QFormat::Q4_1 => Data::Q4_1(blocks(bytes, n, k)?),
            QFormat::Q8_0 => Data::Q8_0(blocks(bytes, n, k)?),
        };
        Ok(Self { n, k, data })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.n
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.k
    }

    /// Row `r` as f32 (an embedding lookup).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let nb = self.k / QK;
        fn copy<B: GgmlBlock>(b: &[B], out: &mut [f32]) {
            for (blk, o) in b.iter().zip(out.chunks_exact_mut(QK)) {
                o.copy_from_slice(&blk.dequantize());
            }
        }
        match &self.data {
            Data::Q4_0(b) => copy(&b[r * nb..(r + 1) * nb], out),
            Data::Q4_1(b) => copy(&b[r * nb..(r + 1) * nb], out),
            Data::Q8_0(b) => copy(&b[r * nb..(r + 1) * nb], out),
        }
    }

    /// `out[i * n + j] = dot(x row i, W row j)` for `m = x.len() / k` rows.
    pub fn matmul(&self, x: &[f32], out: &mut [f32]) {
        let (n, k) = (self.n, self.k);
        assert_eq!(x.len() % k, 0, "activation length is not a multiple of k");
        let m = x.len() / k;
        assert_eq!(out.len(), m * n, "output length");
        match &self.data {
            Data::Q4_0(w) => run(
                w,
                n,
                k,
                x,
                out,
                quantize_row_q8_0,
                dot::dot_q4_0_q8_0,
                gemm::tile_q4_0,
            ),
            Data::Q4_1(w) => run(
                w,
                n,
                k,
                x,
                out,
                quantize_row_q8_1,
                dot::dot_q4_1_q8_1,
                gemm::tile_q4_1,
            ),
            Data::Q8_0(w) => run(
                w,
                n,
                k,
                x,
                out,
                quantize_row_q8_0,
                dot::dot_q8_0_q8_0,
                gemm::tile_q8_0,
            ),
        }
    }
}

/// Raw output pointer shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes only the columns of its own band of weight rows.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Four weight rows against one to four activation rows.
type Tile<W, A> = fn([&[W]; TILE_ROWS], &[&[A]], &mut TileOut);

#[allow(clippy::too_many_arguments)]
fn run<W: Sync, A: Default + Copy + Send + Sync>(
    w: &[W],
    n: usize,
    k: usize,
    x: &[f32],
    out: &mut [f32],
    quantize: fn(&[f32], &mut [A]),
    dot: fn(&[W], &[A]) -> f32,
    tile: Tile<W, A>,
) {
    let nb = k / QK;
    let m = x.len() / k;
    let mut xq = vec![A::default(); m * nb];
    if m > 1 {
        xq.par_chunks_mut(nb)
            .zip(x.par_chunks(k))
            .for_each(|(q, row)| quantize(row, q));
    } else {
        quantize(x, &mut xq);
    }
    let ptr = OutPtr(out.as_mut_ptr());
    let bands = n.div_ceil(BAND);
    (0..bands).into_par_iter().for_each(|band| {
        let p = ptr;
        let r0 = band * BAND;
        let r1 = (r0 + BAND).min(n);
        let row = |r: usize| &w[r * nb..(r + 1) * nb];
        let act = |i: usize| &xq[i * nb..(i + 1) * nb];
        let mut tile_out: TileOut = [[0.0; TILE_COLS]; TILE_ROWS];
        // Up to four activation rows at a time against four weight rows at a time.
        for i0 in (0..m).step_by(TILE_COLS) {
            let cols = (m - i0).min(TILE_COLS);
            let acts: [&[A]; TILE_COLS] = std::array::from_fn(|c| act(i0 + c.min(cols - 1)));
            let mut r = r0;
            // SAFETY (the writes below): i < m and r < n, so each index is inside `out`;
            // each (i, r) is written by exactly one task (the one owning row r).
            while r + TILE_ROWS <= r1 {
                tile(
                    std::array::from_fn(|j| row(r + j)),
                    &acts[..cols],
                    &mut tile_out,
                );
                for (j, outs) in tile_out.iter().enumerate() {
                    for (c, &v) in outs[..cols].iter().enumerate() {
                        unsafe { *p.0.add((i0 + c) * n + r + j) = v };
                    }
                }
                r += TILE_ROWS;
            }
            for r in r..r1 {
                for (c, a) in acts[..cols].iter().enumerate() {
                    let v = dot(row(r), a);
                    unsafe { *p.0.add((i0 + c) * n + r) = v };
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::BlockQ8_1;

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
    fn matmul_matches_row_by_row_dots() {
        let (n, k, m) = (37, 96, 5);
        let w = QMatrix::from_bytes(QFormat::Q4_1, &q4_1_bytes(n, k), n, k).unwrap();
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let mut out = vec![0f32; m * n];
        w.matmul(&x, &mut out);
        let wb: Vec<BlockQ4_1> = read_blocks(&q4_1_bytes(n, k));
        for i in 0..m {
            let mut a = vec![BlockQ8_1::default(); k / QK];
            quantize_row_q8_1(&x[i * k..(i + 1) * k], &mut a);
            for r in 0..n {
                let want = dot::dot_q4_1_q8_1_ref(&wb[r * 3..(r + 1) * 3], &a);
                assert_eq!(out[i * n + r].to_bits(), want.to_bits(), "row {i} col {r}");
            }
        }
        // Batching does not change any row's result.
        let mut single = vec![0f32; n];
        w.matmul(&x[2 * k..3 * k], &mut single);
        assert_eq!(&single[..], &out[2 * n..3 * n]);
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
            Some(QMatrixError::RowLength { k: 33 })
        );
    }
}
