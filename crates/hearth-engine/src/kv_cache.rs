//! A per-sequence KV cache in f16 (llama.cpp's default cache type).
//!
//! On the CPU the cache is plain memory laid out for `hearth_kernels::attention`: keys
//! `[cell][kv_head * head_dim]`, values transposed `[kv_head][d][cell]`. On a GPU it is a
//! pair of candle tensors per layer, `(kv_heads, capacity, head_dim)`, written in place.
//! Both grow by doubling (in multiples of 64 cells) up to the context length.

use candle_core::{DType, Device, Tensor};
use half::f16;

use crate::EngineError;

const MIN_CAPACITY: usize = 256;

struct HostLayer {
    k: Vec<f16>,
    v_t: Vec<f16>,
}

enum Storage {
    Host(Vec<HostLayer>),
    Device(Vec<(Tensor, Tensor)>),
}

pub struct KvCache {
    storage: Storage,
    num_layers: usize,
    len: usize,
    capacity: usize,
    max_len: usize,
    num_kv_heads: usize,
    head_dim: usize,
    device: Device,
}

impl KvCache {
    pub fn new(
        num_layers: usize,
        num_kv_heads: usize,
        head_dim: usize,
        max_len: usize,
        device: &Device,
    ) -> Self {
        let storage = if device.is_cpu() {
            Storage::Host(Vec::new())
        } else {
            Storage::Device(Vec::new())
        };
        Self {
            storage,
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

    /// Cells allocated per layer.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets everything after the first `len` tokens.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Bytes held by the buffers.
    pub fn size_bytes(&self) -> usize {
        self.num_layers * 2 * self.num_kv_heads * self.capacity * self.head_dim * 2
    }

    /// Makes room for `total` tokens (plus padding to a multiple of 64 cells).
    pub(crate) fn reserve(&mut self, total: usize) -> Result<(), EngineError> {
        let needed = total.div_ceil(64) * 64;
        if needed <= self.capacity {
            return Ok(());
        }
        let limit = self.max_len.div_ceil(64) * 64;
        let cap = needed
            .max(self.capacity * 2)
            .max(MIN_CAPACITY)
            .min(limit.max(needed));
        let width = self.num_kv_heads * self.head_dim;
        let (old_cap, len) = (self.capacity, self.len);
        match &mut self.storage {
            Storage::Host(layers) => {
                if layers.is_empty() {
                    layers.extend((0..self.num_layers).map(|_| HostLayer {
                        k: Vec::new(),
                        v_t: Vec::new(),
                    }));
                }
                for l in layers.iter_mut() {
                    l.k.resize(cap * width, f16::ZERO);
                    let mut v_t = vec![f16::ZERO; width * cap];
                    for row in 0..width {
                        v_t[row * cap..row * cap + len]
                            .copy_from_slice(&l.v_t[row * old_cap..row * old_cap + len]);
                    }
                    l.v_t = v_t;
                }
            }
            Storage::Device(layers) => {
                let shape = (self.num_kv_heads, cap, self.head_dim);
                let mut grown = Vec::with_capacity(self.num_layers);
                for i in 0..self.num_layers {
                    let nk = Tensor::zeros(shape, DType::F16, &self.device)?;
                    let nv = Tensor::zeros(shape, DType::F16, &self.device)?;
                    if let (Some((k, v)), true) = (layers.get(i), len > 0) {
                        nk.slice_set(&k.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                        nv.slice_set(&v.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                    }
                    grown.push((nk, nv));
                }
                *layers = grown;
            }
        }
        self.capacity = cap;
        Ok(())
    }

    /// CPU: stores `k`, `v` (`seq` rows of kv_heads * head_dim) after the committed tokens
    /// and returns the layer's keys and transposed values.
    pub(crate) fn append_host(
        &mut self,
        layer: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<(&[f16], &[f16]), EngineError> {
        let width = self.num_kv_heads * self.head_dim;
        let (len, cap) = (self.len, self.capacity);
        let Storage::Host(layers) = &mut self.storage else {
            return Err(EngineError::Device("host append on a device cache".into()));
        };
        let l = &mut layers[layer];
        for (t, (krow, vrow)) in k.chunks_exact(width).zip(v.chunks_exact(width)).enumerate() {
            let cell = len + t;
            for (dst, &x) in l.k[cell * width..(cell + 1) * width].iter_mut().zip(krow) {
                *dst = f16::from_f32(x);
            }
            for (row, &x) in vrow.iter().enumerate() {
                l.v_t[row * cap + cell] = f16::from_f32(x);
            }
        }
        Ok((&l.k, &l.v_t))
    }

    /// GPU: writes `k`, `v` (kv_heads, seq, head_dim) after the committed tokens and
    /// returns all keys and values so far as f32.
    pub(crate) fn append_device(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor), EngineError> {
        let seq = k.dim(1)?;
        let len = self.len;
        let Storage::Device(layers) = &self.storage else {
            return Err(EngineError::Device("device append on a host cache".into()));
        };
        let (ck, cv) = &layers[layer];
        ck.slice_set(&k.to_dtype(DType::F16)?, 1, len)?;
        cv.slice_set(&v.to_dtype(DType::F16)?, 1, len)?;
        let all = |c: &Tensor| c.narrow(1, 0, len + seq)?.to_dtype(DType::F32);
        Ok((all(ck)?, all(cv)?))
    }

    /// Marks the tokens written by the last appends as part of the sequence.
    pub(crate) fn commit(&mut self, total: usize) {
        self.len = total;
    }
}
