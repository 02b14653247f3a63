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
use half::slice::HalfBitsSliceExt;
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

    /// CPU: stores `k`, `v` (rows of kv_heads * head_dim) in `table`'s cells after its
    /// committed tokens. The cells must have been allocated.
    pub(crate) fn write_host(
        &mut self,
        layer: usize,
        table: &BlockTable,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), EngineError> {
        let width = self.num_kv_heads * self.head_dim;
        let Storage::Host(layers) = &mut self.storage else {
            return Err(EngineError::Device("host write to a device cache".into()));
        };
        /// Writes one token's keys (a row) and values (a column of its block).
        fn put<T: Copy>(
            k: &mut [T],
            v: &mut [T],
            (krow, vrow): (&[f32], &[f32]),
            (block, within, width): (usize, usize, usize),
            cast: impl Fn(f32) -> T,
        ) {
            let cell = block * BLOCK_SIZE + within;
            for (dst, &x) in k[cell * width..(cell + 1) * width].iter_mut().zip(krow) {
                *dst = cast(x);
            }
            let vb = &mut v[block * BLOCK_SIZE * width..(block + 1) * BLOCK_SIZE * width];
            for (row, &x) in vrow.iter().enumerate() {
                vb[row * BLOCK_SIZE + within] = cast(x);
            }
        }
        let l = &mut layers[layer];
        for (t, rows) in k.chunks_exact(width).zip(v.chunks_exact(width)).enumerate() {
            let pos = table.len + t;
            let at = (
                table.blocks[pos / BLOCK_SIZE] as usize,
                pos % BLOCK_SIZE,
                width,
            );
            match l {
                HostLayer::F16 { k, v } => put(k, v, rows, at, |x| f16::from_f32(x).to_bits()),
                HostLayer::F32 { k, v } => put(k, v, rows, at, |x| x),
            }
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
            c.write_host(0, &t, &k, &v).unwrap();
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
