//! The paged KV cache: one pool of fixed-size blocks shared by every sequence, and a
//! [`BlockTable`] per sequence listing the blocks that hold its tokens, in order.
//!
//! Sequences take blocks as they grow and give them all back when they finish, so memory
//! goes where the tokens are, not where a context length might have been; the scheduler
//! admits work by free blocks and preempts when the pool runs dry.
//!
//! Values are stored in f16 (llama.cpp's default cache type). On the CPU a block of one
//! layer holds keys `[cell][kv_head * head_dim]` and values transposed
//! `[kv_head * head_dim][cell]`, the layout `hearth_kernels::attention` reads; the buffers
//! are zero-allocated, so untouched blocks cost no resident memory. On a GPU each layer is
//! a pair of candle tensors `(blocks * block_size, kv_heads, head_dim)`, written in place
//! and gathered by the block table.

use candle_core::{DType, Device, Tensor};
use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use hearth_kernels::attention::KvCells;

use crate::EngineError;

/// Tokens per block.
pub const BLOCK_SIZE: usize = 16;

/// Where one sequence's tokens live in the pool.
#[derive(Debug, Default)]
pub struct BlockTable {
    blocks: Vec<u32>,
    len: usize,
}

impl BlockTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Block ids, in token order.
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    /// Forgets everything after the first `len` tokens (the blocks stay held).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

/// What a host cache stores its cells as.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvDtype {
    /// Half the memory; llama.cpp's default (and bit-compatible with it).
    #[default]
    F16,
    /// Full precision, for f32 models checked against f32 references.
    F32,
}

impl KvDtype {
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F16 => 2,
            KvDtype::F32 => 4,
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f16" => Ok(Self::F16),
            "f32" => Ok(Self::F32),
            _ => Err(format!("`{s}` is not a KV cache dtype (f16, f32)")),
        }
    }
}

enum HostLayer {
    /// f16 bits; `u16` so that the allocation is zeroed lazily by the OS.
    F16 {
        k: Vec<u16>,
        v: Vec<u16>,
    },
    F32 {
        k: Vec<f32>,
        v: Vec<f32>,
    },
}

enum Storage {
    Host(Vec<HostLayer>),
    Device(Vec<(Tensor, Tensor)>),
}

/// The block pool, for all layers.
pub struct KvCache {
    storage: Storage,
    num_layers: usize,
    num_kv_heads: usize,
    head_dim: usize,
    num_blocks: usize,
    dtype: KvDtype,
    /// Free block ids; taken from the end.
    free: Vec<u32>,
}

impl KvCache {
    /// A pool of `num_blocks` blocks of [`BLOCK_SIZE`] tokens, laid out for `device`.
    pub fn new(
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
        num_blocks: usize,
        device: &Device,
    ) -> Result<Self, EngineError> {
        let host = device.is_cpu();
        Self::with_layout(
            num_layers,
            num_kv_heads,
            head_dim,
            num_blocks,
            device,
            host,
            KvDtype::F16,
        )
    }

    /// Like [`KvCache::new`]; `host` picks plain memory for the CPU kernels (cells of
    /// `dtype`), else f16 candle tensors on `device`.
    pub fn with_layout(
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
        num_blocks: usize,
        device: &Device,
        host: bool,
        dtype: KvDtype,
    ) -> Result<Self, EngineError> {
        if num_blocks == 0 || num_blocks > u32::MAX as usize {
            return Err(EngineError::Input(format!(
                "a KV cache of {num_blocks} blocks is not possible"
            )));
        }
        let cells = num_blocks * BLOCK_SIZE;
        let width = num_kv_heads * head_dim;
        let storage = if host {
            Storage::Host(
                (0..num_layers)
                    .map(|_| match dtype {
                        KvDtype::F16 => HostLayer::F16 {
                            k: vec![0u16; cells * width],
                            v: vec![0u16; cells * width],
                        },
                        KvDtype::F32 => HostLayer::F32 {
                            k: vec![0f32; cells * width],
                            v: vec![0f32; cells * width],
                        },
                    })
                    .collect(),
            )
        } else {
            let shape = (cells, num_kv_heads, head_dim);
            let mut layers = Vec::with_capacity(num_layers);
            for _ in 0..num_layers {
                layers.push((
                    Tensor::zeros(shape, DType::F16, device)?,
                    Tensor::zeros(shape, DType::F16, device)?,
                ));
            }
            Storage::Device(layers)
        };
        Ok(Self {
            storage,
            num_layers,
            num_kv_heads,
            head_dim,
            num_blocks,
            dtype: if host { dtype } else { KvDtype::F16 },
            free: (0..num_blocks as u32).rev().collect(),
        })
    }

    /// Bytes one block of `dtype` cells takes over all layers (keys and values).
    pub fn block_bytes(
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
        dtype: KvDtype,
    ) -> usize {
        num_layers * 2 * BLOCK_SIZE * num_kv_heads * head_dim * dtype.bytes()
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    pub fn used_blocks(&self) -> usize {
        self.num_blocks - self.free.len()
    }

    /// Tokens the whole pool can hold.
    pub fn capacity_tokens(&self) -> usize {
        self.num_blocks * BLOCK_SIZE
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(tokens: usize) -> usize {
        tokens.div_ceil(BLOCK_SIZE)
    }

    /// Bytes held by the pool.
    pub fn size_bytes(&self) -> usize {
        self.num_blocks
            * Self::block_bytes(
                self.num_layers,
                self.num_kv_heads,
                self.head_dim,
                self.dtype,
            )
    }

    /// Grows `table` to hold `total` tokens. All or nothing: when the pool has too few
    /// free blocks nothing is taken and `false` comes back.
    pub fn allocate(&mut self, table: &mut BlockTable, total: usize) -> bool {
        let needed = Self::blocks_for(total).saturating_sub(table.blocks.len());
        if needed > self.free.len() {
            return false;
        }
        let from = self.free.len() - needed;
        table.blocks.extend(self.free.drain(from..).rev());
        true
    }

    /// Gives all of `table`'s blocks back to the pool and empties it.
    pub fn release(&mut self, table: &mut BlockTable) {
        self.free.extend(table.blocks.drain(..).rev());
        table.len = 0;
    }

    /// CPU: stores each write's `k`, `v` (rows of kv_heads * head_dim) in its table's
    /// cells after the committed tokens; the cells must have been allocated. Sequences go
    /// over the compute team when their blocks are disjoint (always, for tables of this
    /// pool: a block belongs to one table; checked, and written one by one otherwise).
    pub(crate) fn write_host_batch(
        &mut self,
        layer: usize,
        writes: &[HostWrite<'_>],
    ) -> Result<(), EngineError> {
        let width = self.num_kv_heads * self.head_dim;
        let Storage::Host(layers) = &mut self.storage else {
            return Err(EngineError::Device("host write to a device cache".into()));
        };
        for w in writes {
            let fits = w.k.len() % width == 0
                && w.v.len() == w.k.len()
                && w.blocks(width)
                    .is_some_and(|b| b.iter().all(|&b| (b as usize) < self.num_blocks));
            if !fits {
                return Err(EngineError::Input(format!(
                    "KV write of {} values (rows of {width}) past the {} cells allocated",
                    w.k.len(),
                    w.table.blocks.len() * BLOCK_SIZE
                )));
            }
        }
        let (k, v) = match &mut layers[layer] {
            HostLayer::F16 { k, v } => (Cells::F16(k.as_mut_ptr()), Cells::F16(v.as_mut_ptr())),
            HostLayer::F32 { k, v } => (Cells::F32(k.as_mut_ptr()), Cells::F32(v.as_mut_ptr())),
        };
        let put = |w: &HostWrite<'_>| {
            for (t, (krow, vrow)) in
                w.k.chunks_exact(width)
                    .zip(w.v.chunks_exact(width))
                    .enumerate()
            {
                let pos = w.table.len + t;
                let block = w.table.blocks[pos / BLOCK_SIZE] as usize;
                let (within, cell) = (pos % BLOCK_SIZE, block * BLOCK_SIZE + pos % BLOCK_SIZE);
                // SAFETY: block < num_blocks (checked above), so the key row and the value
                // column lie inside the layer's buffers; tasks running at once write
                // disjoint blocks (checked before they are started).
                unsafe {
                    k.row(cell * width, krow);
                    v.column(block * BLOCK_SIZE * width + within, BLOCK_SIZE, vrow);
                }
            }
        };
        if writes.len() > 1 && disjoint(writes, width) {
            hearth_kernels::team::for_each(writes.len(), |i| put(&writes[i]));
        } else {
            writes.iter().for_each(put);
        }
        Ok(())
    }

    /// CPU: one layer's keys and transposed values, for all blocks.
    pub(crate) fn host_layer(
        &self,
        layer: usize,
    ) -> Result<(KvCells<'_>, KvCells<'_>), EngineError> {
        let Storage::Host(layers) = &self.storage else {
            return Err(EngineError::Device("host read of a device cache".into()));
        };
        Ok(match &layers[layer] {
            HostLayer::F16 { k, v } => (
                KvCells::F16(k.reinterpret_cast()),
                KvCells::F16(v.reinterpret_cast()),
            ),
            HostLayer::F32 { k, v } => (KvCells::F32(k), KvCells::F32(v)),
        })
    }

    /// GPU: writes `k`, `v` (seq, kv_heads, head_dim) after `table`'s committed tokens and
    /// returns all of its keys and values so far as f32, `(kv_heads, total, head_dim)`.
    pub(crate) fn append_device(
        &mut self,
        layer: usize,
        table: &BlockTable,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor), EngineError> {
        let seq = k.dim(0)?;
        let total = table.len + seq;
        let Storage::Device(layers) = &self.storage else {
            return Err(EngineError::Device("device write to a host cache".into()));
        };
        let (ck, cv) = &layers[layer];
        let (k, v) = (k.to_dtype(DType::F16)?, v.to_dtype(DType::F16)?);
        // Write run by run: the new tokens' cells are contiguous within each block.
        let mut t = 0;
        while t < seq {
            let pos = table.len + t;
            let within = pos % BLOCK_SIZE;
            let run = (BLOCK_SIZE - within).min(seq - t);
            let cell = table.blocks[pos / BLOCK_SIZE] as usize * BLOCK_SIZE + within;
            ck.slice_set(&k.narrow(0, t, run)?.contiguous()?, 0, cell)?;
            cv.slice_set(&v.narrow(0, t, run)?.contiguous()?, 0, cell)?;
            t += run;
        }
        let cells: Vec<u32> = (0..total)
            .map(|p| table.blocks[p / BLOCK_SIZE] * BLOCK_SIZE as u32 + (p % BLOCK_SIZE) as u32)
            .collect();
        let ids = Tensor::from_vec(cells, total, ck.device())?;
        let gather = |c: &Tensor| -> candle_core::Result<Tensor> {
            c.index_select(&ids, 0)?
                .transpose(0, 1)?
                .contiguous()?
                .to_dtype(DType::F32)
        };
        Ok((gather(ck)?, gather(cv)?))
    }

    /// Marks the tokens written by the last writes as part of the sequence.
    pub(crate) fn commit(table: &mut BlockTable, total: usize) {
        table.len = total;
    }
}

/// One sequence's new keys and values for [`KvCache::write_host_batch`].
pub(crate) struct HostWrite<'a> {
    pub table: &'a BlockTable,
    pub k: &'a [f32],
    pub v: &'a [f32],
}

impl HostWrite<'_> {
    /// The blocks the new tokens (rows of `width` values) go to, or none if the table has
    /// too few.
    fn blocks(&self, width: usize) -> Option<&[u32]> {
        let end = KvCache::blocks_for(self.table.len + self.k.len() / width);
        self.table.blocks.get(self.table.len / BLOCK_SIZE..end)
    }
}

/// Whether no block is written by two of `writes` (rows of `width` values).
fn disjoint(writes: &[HostWrite<'_>], width: usize) -> bool {
    let mut touched: Vec<(u32, usize)> = Vec::new();
    for (i, w) in writes.iter().enumerate() {
        let blocks = w.blocks(width).unwrap_or_default();
        touched.extend(blocks.iter().map(|&b| (b, i)));
    }
    touched.sort_unstable();
    touched
        .windows(2)
        .all(|p| p[0].0 != p[1].0 || p[0].1 == p[1].1)
}

/// A layer's key or value cells, written from several threads at once.
#[derive(Clone, Copy)]
enum Cells {
    F16(*mut u16),
    F32(*mut f32),
}
// SAFETY: used only by `write_host_batch`, whose tasks write disjoint cells.
unsafe impl Send for Cells {}
unsafe impl Sync for Cells {}

impl Cells {
    /// Stores `x` at elements `at..at + x.len()`.
    unsafe fn row(self, at: usize, x: &[f32]) {
        match self {
            Cells::F16(p) => {
                let dst = std::slice::from_raw_parts_mut(p.add(at), x.len());
                dst.reinterpret_cast_mut::<f16>().convert_from_f32_slice(x);
            }
            Cells::F32(p) => std::ptr::copy_nonoverlapping(x.as_ptr(), p.add(at), x.len()),
        }
    }

    /// Stores `x[i]` at element `at + i * stride`.
    unsafe fn column(self, at: usize, stride: usize, x: &[f32]) {
        match self {
            Cells::F16(p) => {
                let mut bits = [0u16; 64];
                for (c, chunk) in x.chunks(64).enumerate() {
                    let bits = &mut bits[..chunk.len()];
                    bits.reinterpret_cast_mut::<f16>()
                        .convert_from_f32_slice(chunk);
                    for (i, &b) in bits.iter().enumerate() {
                        *p.add(at + (64 * c + i) * stride) = b;
                    }
                }
            }
            Cells::F32(p) => {
                for (i, &v) in x.iter().enumerate() {
                    *p.add(at + i * stride) = v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_taken_all_or_nothing_and_given_back() {
        let mut c = KvCache::new(2, 1, 4, 4, &Device::Cpu).unwrap();
        let (mut a, mut b) = (BlockTable::new(), BlockTable::new());
        assert!(c.allocate(&mut a, 17)); // 2 blocks
        assert_eq!(c.free_blocks(), 2);
        assert!(!c.allocate(&mut b, 3 * BLOCK_SIZE)); // needs 3
        assert!(b.blocks().is_empty());
        assert_eq!(c.free_blocks(), 2);
        assert!(c.allocate(&mut a, 2 * BLOCK_SIZE)); // already held
        assert_eq!(c.free_blocks(), 2);
        assert!(c.allocate(&mut b, 2 * BLOCK_SIZE));
        assert_eq!(c.used_blocks(), 4);
        c.release(&mut a);
        assert_eq!((c.free_blocks(), a.len()), (2, 0));
        let held: std::collections::HashSet<u32> = b.blocks().iter().copied().collect();
        assert!(c.allocate(&mut a, 1));
        assert!(
            !held.contains(&a.blocks()[0]),
            "a block is never handed out twice"
        );
    }

    #[test]
    fn batched_host_writes_equal_writes_one_by_one() {
        let (heads, hd) = (2, 3);
        let width = heads * hd;
        let make = || KvCache::with_layout(1, heads, hd, 16, &Device::Cpu, true, KvDtype::F16);
        let (mut one, mut many) = (make().unwrap(), make().unwrap());
        // Five sequences: already holding 0, 5, 15, 16 and 31 tokens, each given 1 to 20
        // new ones (some cross a block edge).
        let (held, new) = ([0usize, 5, 15, 16, 31], [1usize, 20, 2, 1, 3]);
        let mut tables: Vec<BlockTable> = Vec::new();
        for (h, n) in held.iter().zip(&new) {
            let mut t = BlockTable::new();
            assert!(one.allocate(&mut t, h + n));
            tables.push(t);
        }
        // The same blocks in the second pool: allocate in the same order.
        for (t, (h, n)) in tables.iter().zip(held.iter().zip(&new)) {
            let mut u = BlockTable::new();
            assert!(many.allocate(&mut u, h + n));
            assert_eq!(u.blocks(), t.blocks());
        }
        for (t, h) in tables.iter_mut().zip(&held) {
            KvCache::commit(t, *h);
        }
        let data: Vec<(Vec<f32>, Vec<f32>)> = new
            .iter()
            .enumerate()
            .map(|(s, &n)| {
                let k = (0..n * width)
                    .map(|i| (s * 1000 + i) as f32 * 0.37)
                    .collect();
                let v = (0..n * width)
                    .map(|i| -((s * 1000 + i) as f32) * 0.11)
                    .collect();
                (k, v)
            })
            .collect();
        let writes: Vec<HostWrite> = tables
            .iter()
            .zip(&data)
            .map(|(table, (k, v))| HostWrite { table, k, v })
            .collect();
        assert!(disjoint(&writes, width));
        many.write_host_batch(0, &writes).unwrap();
        for w in &writes {
            one.write_host_batch(0, std::slice::from_ref(w)).unwrap();
        }
        let (a, b) = (one.host_layer(0).unwrap(), many.host_layer(0).unwrap());
        for i in 0..16 * BLOCK_SIZE * width {
            assert_eq!(a.0.get(i).to_bits(), b.0.get(i).to_bits(), "key {i}");
            assert_eq!(a.1.get(i).to_bits(), b.1.get(i).to_bits(), "value {i}");
        }
        // Written where the one-by-one path (tested below) puts them, not left zero.
        assert_ne!(
            b.0.get(tables[1].blocks()[0] as usize * BLOCK_SIZE * width + 5 * width),
            0.0
        );
    }

    #[test]
    fn writes_sharing_a_block_are_not_run_at_once_and_bad_lengths_are_refused() {
        // Two tables of different pools may name the same block: written one by one.
        let width = 4;
        let mut c = KvCache::with_layout(1, 2, 2, 2, &Device::Cpu, true, KvDtype::F32).unwrap();
        let mut d = KvCache::with_layout(1, 2, 2, 2, &Device::Cpu, true, KvDtype::F32).unwrap();
        let (mut a, mut b) = (BlockTable::new(), BlockTable::new());
        assert!(c.allocate(&mut a, 1) && d.allocate(&mut b, 1));
        assert_eq!(a.blocks(), b.blocks());
        let (k1, k2) = (vec![1f32; width], vec![2f32; width]);
        let writes = [
            HostWrite {
                table: &a,
                k: &k1,
                v: &k1,
            },
            HostWrite {
                table: &b,
                k: &k2,
                v: &k2,
            },
        ];
        assert!(!disjoint(&writes, width));
        c.write_host_batch(0, &writes).unwrap();
        let cell = a.blocks()[0] as usize * BLOCK_SIZE * width;
        assert_eq!(
            c.host_layer(0).unwrap().0.get(cell),
            2.0,
            "in order: the last wins"
        );
        // More rows than the table has cells, or keys and values of different lengths.
        let long = vec![0f32; (BLOCK_SIZE + 1) * width];
        let bad = [HostWrite {
            table: &a,
            k: &long,
            v: &long,
        }];
        assert!(c.write_host_batch(0, &bad).is_err());
        let bad = [HostWrite {
            table: &a,
            k: &k1,
            v: &k1[..2],
        }];
        assert!(c.write_host_batch(0, &bad).is_err());
        // A table of a larger pool naming blocks this one does not have: refused, not
        // written out of bounds.
        let mut big = KvCache::with_layout(1, 2, 2, 8, &Device::Cpu, true, KvDtype::F32).unwrap();
        let mut far = BlockTable::new();
        assert!(big.allocate(&mut far, 8 * BLOCK_SIZE));
        far.blocks.retain(|&b| b as usize >= 2);
        let bad = [HostWrite {
            table: &far,
            k: &k1,
            v: &k1,
        }];
        assert!(c.write_host_batch(0, &bad).is_err());
    }

    #[test]
    fn host_writes_land_in_the_tables_cells() {
        for dtype in [KvDtype::F16, KvDtype::F32] {
            let mut c = KvCache::with_layout(1, 2, 2, 3, &Device::Cpu, true, dtype).unwrap();
            assert_eq!(c.size_bytes(), 3 * KvCache::block_bytes(1, 2, 2, dtype));
            let (mut other, mut t) = (BlockTable::new(), BlockTable::new());
            assert!(c.allocate(&mut other, 1)); // so t does not start at block 0
            assert!(c.allocate(&mut t, BLOCK_SIZE + 1));
            let width = 4;
            let rows = BLOCK_SIZE + 1;
            // Values exact in f16, and one that is not (kept whole only in f32).
            let k: Vec<f32> = (0..rows * width).map(|i| i as f32 + 0.0001).collect();
            let v: Vec<f32> = (0..rows * width).map(|i| -(i as f32)).collect();
            c.write_host_batch(
                0,
                &[HostWrite {
                    table: &t,
                    k: &k,
                    v: &v,
                }],
            )
            .unwrap();
            KvCache::commit(&mut t, rows);
            let (kc, vc) = c.host_layer(0).unwrap();
            for pos in 0..rows {
                let block = t.blocks()[pos / BLOCK_SIZE] as usize;
                let cell = block * BLOCK_SIZE + pos % BLOCK_SIZE;
                for d in 0..width {
                    let want = k[pos * width + d];
                    let want = match dtype {
                        KvDtype::F16 => f16::from_f32(want).to_f32(),
                        KvDtype::F32 => want,
                    };
                    assert_eq!(kc.get(cell * width + d), want);
                    let vv = vc.get(block * BLOCK_SIZE * width + d * BLOCK_SIZE + pos % BLOCK_SIZE);
                    assert_eq!(vv, -((pos * width + d) as f32));
                }
            }
        }
    }
}
