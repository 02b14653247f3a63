//! A contiguous per-sequence KV cache: one preallocated (kv_heads, capacity, head_dim)
//! buffer per layer for keys and one for values, written in place and grown by doubling.
//! (The paged, block-table cache for batched serving builds on the same interface.)

use candle_core::{DType, Device, Tensor};

use crate::EngineError;

pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    num_layers: usize,
    len: usize,
    capacity: usize,
    max_len: usize,
    num_kv_heads: usize,
    head_dim: usize,
    device: Device,
}

const MIN_CAPACITY: usize = 256;

impl KvCache {
    pub fn new(
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
        max_len: usize,
        device: &Device,
    ) -> Self {
        Self {
            // Buffers are allocated by the first `reserve`.
            layers: Vec::new(),
            num_layers,
            len: 0,
            capacity: 0,
            max_len,
            num_kv_heads,
            head_dim,
            device: device.clone(),
        }
    }

    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets everything after the first `len` tokens.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Bytes held by the buffers.
    pub fn size_bytes(&self) -> usize {
        self.num_layers * 2 * self.num_kv_heads * self.capacity * self.head_dim * 4
    }

    /// Makes room for `total` tokens.
    pub(crate) fn reserve(&mut self, total: usize) -> Result<(), EngineError> {
        if total <= self.capacity {
            return Ok(());
        }
        let cap = total
            .max(self.capacity * 2)
            .max(MIN_CAPACITY)
            .min(self.max_len.max(total));
        let shape = (self.num_kv_heads, cap, self.head_dim);
        let mut layers = Vec::with_capacity(self.num_layers);
        for i in 0..self.num_layers {
            let nk = Tensor::zeros(shape, DType::F32, &self.device)?;
            let nv = Tensor::zeros(shape, DType::F32, &self.device)?;
            if let (Some((k, v)), true) = (self.layers.get(i), self.len > 0) {
                nk.slice_set(&k.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                nv.slice_set(&v.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
            }
            layers.push((nk, nv));
        }
        self.layers = layers;
        self.capacity = cap;
        Ok(())
    }

    /// Writes `k`, `v` (kv_heads, seq, head_dim) after the committed tokens of `layer` and
    /// returns views of all keys and values up to and including them.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor), EngineError> {
        let seq = k.dim(1)?;
        let (ck, cv) = &self.layers[layer];
        ck.slice_set(k, 1, self.len)?;
        cv.slice_set(v, 1, self.len)?;
        Ok((
            ck.narrow(1, 0, self.len + seq)?,
            cv.narrow(1, 0, self.len + seq)?,
        ))
    }

    /// Marks the tokens written by the last `append`s as part of the sequence.
    pub(crate) fn commit(&mut self, total: usize) {
        self.len = total;
    }
}
